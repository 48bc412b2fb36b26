"""Curvature plug-ins: each module here registers one `engine.curvature.Curvature` (found by
name on first use of the registry, so a new curvature is one file here plus its test)."""
