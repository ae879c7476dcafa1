"""Commands of this area arrive with their issue."""
COMMANDS: list = []
