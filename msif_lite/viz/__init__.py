"""Looking at results (notebook 07 §Exploring results): static plots and the explorer
widget. Library code builds figures with the object-oriented API and never switches the
matplotlib backend."""
