"""Quality: does a pair dataset carry its attribute? Measures, model-based measures, the report, plots."""
