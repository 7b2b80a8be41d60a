"""`python -m gatt_client`: the `gatt` command line."""

from gatt_client.cli import main

main()
