"""
Choose a classifier for the digits data set and tune it, with Optuna.

The objective picks either an SVC or a random forest, then the hyperparameters of the one it
picked (define-by-run: each branch names its own parameters), and returns the 3-fold
cross-validated accuracy.

    $ python sklearn_simple.py
"""

import optuna

import sklearn.datasets
import sklearn.ensemble
import sklearn.model_selection
import sklearn.svm


def objective(trial):
    digits = sklearn.datasets.load_digits()
    x, y = digits.data, digits.target

    classifier_name = trial.suggest_categorical("classifier", ["SVC", "RandomForest"])
    if classifier_name == "SVC":
        svc_c = trial.suggest_float("svc_c", 1e-4, 1e4, log=True)
        classifier_obj = sklearn.svm.SVC(C=svc_c, gamma="scale")
    else:
        rf_max_depth = trial.suggest_int("rf_max_depth", 2, 32, log=True)
        classifier_obj = sklearn.ensemble.RandomForestClassifier(
            max_depth=rf_max_depth, n_estimators=10
        )

    score = sklearn.model_selection.cross_val_score(classifier_obj, x, y, n_jobs=1, cv=3)
    return score.mean()


if __name__ == "__main__":
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=100)
    print(study.best_trial)
    print("Best value:", study.best_value)
    print("Best params:", study.best_params)
