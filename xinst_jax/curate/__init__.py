"""X-Instruction curation stages: corpus filters, candidates, ratings, evaluator scoring, refine."""
