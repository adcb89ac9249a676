"""Examples of user stages (``kind: custom``); deploy/profiles/post_processing.yaml wires one in."""
