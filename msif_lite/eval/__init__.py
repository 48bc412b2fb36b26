"""Counterfactual evaluation: retraining ground truth and the metrics computed against it
(Notebook 10, "Does influence predict retraining?")."""
