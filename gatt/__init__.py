"""Ghost Attention (GAtt), the method itself: pure Python, no database, queue or web code.

GAtt (Llama 2, section 3.3) teaches a chat model to keep following an instruction given once,
in the first turn, for the whole dialogue. Read the modules in this order:

- `dialogues`: the corpus format (chat-style JSONL) and its validation, every problem with its
  line and field.
- `instructions`: instruction sets (families with verbose/terse templates and values, custom
  instructions) and seeded synthesis of combined instructions, as in the paper.
- `augment`: the two views of a dialogue: the instruction attached to every user turn for
  sampling; kept only in the first turn (or the system message) for training.
- `verifiers`: rewards in [0, 1] with a reason, per constraint, aggregated per instruction.
- `selection`: best-of-K with deterministic tie-breaks and a minimum reward.
- `masks`: token-level loss masks from the model's own chat template; `last_turn` (the paper)
  and `all_turns` (the same summed objective at O(n) tokens) scopes.
"""
