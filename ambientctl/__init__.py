"""`ambientctl`: the one command-line tool for people (up, down, demo, status)."""
