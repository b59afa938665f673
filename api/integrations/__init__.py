"""hpo and the tools people already use: export a study to TensorBoard or MLflow
(:mod:`.export`), and report from a Hugging Face ``Trainer`` (:mod:`.huggingface`) or a
PyTorch Lightning ``Trainer`` (:mod:`.lightning`), stopping when hpo prunes the trial.

Each module imports its tool only when used: ``pip install 'hpo[integrations]'``.
"""
