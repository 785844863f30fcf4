"""Workers that ship with fleet."""
