"""ddm-ray: Distilled Datamodel attribution on Ray.

Train once while keeping a trajectory, distill a tiny synthetic set (synset) per data unit,
then answer leave-one-out questions by fine-tuning on synsets instead of retraining.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import ddm_ray` stays light (no torch)
    if name in ("open_run", "AuditRun", "Run"):
        from ddm_ray import api

        return getattr(api, "AuditRun" if name == "Run" else name)
    if name in ("audit", "audit_options"):
        from ddm_ray import audit_run

        return getattr(audit_run, name)
    raise AttributeError(f"module 'ddm_ray' has no attribute {name!r}")


__all__ = ["__version__", "audit", "audit_options", "open_run", "AuditRun", "Run"]
