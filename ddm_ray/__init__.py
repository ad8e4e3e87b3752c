"""ddm-ray: Distilled Datamodel attribution on Ray.

Train once while keeping a trajectory, distill a tiny synthetic set (synset) per data unit,
then answer leave-one-out questions by fine-tuning on synsets instead of retraining.
"""

__version__ = "0.1.0"
