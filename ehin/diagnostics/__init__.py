"""Model diagnostics: what the trained model and its frozen scorer do, beyond the paper's metrics.

    python -m ehin.diagnostics.scorer_probe [--run RUN]   # what the frozen scorer of L_CL / L_BG rewards
    python -m ehin.diagnostics.expression_kinds RUN/val.jsonl  # PointM per kind of synthetic expression
    python -m ehin.data.fidelity --pointable               # the map size's resolution ceiling (resolution.py)

They sit with the model code they probe (ehin/model/scorer_criteria.py holds the shared mask variants
and negatives); the harness (bench/) only runs and reports experiments.
"""
