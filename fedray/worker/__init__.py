"""What runs in a Ray worker: the thin Ray tasks (``tasks``) around a Ray-free workbench
that builds the shared base model and trains and evaluates one client on it."""
