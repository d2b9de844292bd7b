"""The built-in sources and destinations, installed as `relay_plugins`.

Each module registers itself through the `audit_relay` entry-point group (see pyproject.toml), exactly as a
third-party package would; `file.py` is the shortest complete example of a destination.
"""
