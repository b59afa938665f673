"""
Prune unpromising trials with Optuna: a linear classifier trained step by step.

After each step of SGD on the iris data the objective reports the validation error and asks
whether to stop; the median pruner stops trials whose error is worse than the median of
earlier trials at the same step. A warm-start configuration is queued first, and every
trial records how many steps it ran.

    $ python simple_pruning.py
"""

import optuna

import sklearn.datasets
import sklearn.linear_model
import sklearn.model_selection


def objective(trial):
    iris = sklearn.datasets.load_iris()
    classes = list(set(iris.target))
    train_x, valid_x, train_y, valid_y = sklearn.model_selection.train_test_split(
        iris.data, iris.target, test_size=0.25, random_state=0
    )

    alpha = trial.suggest_float("alpha", 1e-5, 1e-1, log=True)
    clf = sklearn.linear_model.SGDClassifier(alpha=alpha, random_state=0)

    for step in range(20):
        clf.partial_fit(train_x, train_y, classes=classes)

        intermediate_value = 1.0 - clf.score(valid_x, valid_y)
        trial.report(intermediate_value, step)

        if trial.should_prune():
            trial.set_user_attr("steps", step + 1)
            raise optuna.TrialPruned()

    trial.set_user_attr("steps", step + 1)
    return 1.0 - clf.score(valid_x, valid_y)


if __name__ == "__main__":
    study = optuna.create_study(
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2),
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    study.enqueue_trial({"alpha": 1e-3})
    study.optimize(objective, n_trials=20)

    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    print("Number of finished trials:", len(study.trials))
    print("Number of pruned trials:", len(pruned))
    print("Number of complete trials:", len(complete))
    print("First trial (queued):", study.trials[0].params)
    print("Best value:", study.best_value)
    print("Best params:", study.best_params)
    print(study.trials_dataframe()[["number", "value", "params_alpha", "user_attrs_steps", "state"]])
