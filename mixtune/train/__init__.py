"""Training: the trainers (TRL subclasses), router losses and metrics, and the shared set-up."""
