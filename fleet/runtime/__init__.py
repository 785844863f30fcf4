"""The node and what runs on it: lifecycle, lease, maintenance, sessions and moving them."""
