"""`/v1/corpora`: uploaded dialogue corpora (JSONL), validated in full by gatt.dialogues."""
