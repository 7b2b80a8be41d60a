"""`/v1/instruction-sets`: a team's GAtt instruction sets, validated by gatt.instructions."""
