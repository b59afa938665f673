"""Built-in trainables, registered in the ``hpo.trainables`` entry-point group like any other.

Each module is the template to copy for your own: a settings model and a ``train(ctx)``.
"""
