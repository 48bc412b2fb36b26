"""The curvature engine (notebooks 01–04 and 06): tasks and tracked layers, per-sequence
gradients, K-FAC / EK-FAC factors and their inverses, the exact references, scores, and
the multi-stage composition (notebook 07). Nothing here knows about the kit's world."""
