"""Built-in trainables, registered in the ``hpo.trainables`` entry-point group like any other.

Each is a settings model, a model builder and a ``train(ctx)`` loop; the checkpoint life cycle
lives in the context (see docs/trainables.md).
"""
