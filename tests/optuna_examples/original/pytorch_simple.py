"""
Tune a multi-layer perceptron on scikit-learn's digits images with PyTorch and Optuna.

The number of layers, the units and dropout of each layer, the optimizer and its learning
rate are searched. Validation accuracy is reported after every epoch, so that the median
pruner can stop trials that fall behind. The data ships with scikit-learn: nothing is
downloaded.

    $ python pytorch_simple.py
"""

import optuna

import sklearn.datasets
import sklearn.model_selection
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

DEVICE = torch.device("cpu")
BATCHSIZE = 64
CLASSES = 10
EPOCHS = 4
N_TRAIN_EXAMPLES = BATCHSIZE * 10
torch.set_num_threads(1)


def define_model(trial):
    n_layers = trial.suggest_int("n_layers", 1, 3)
    layers = []
    in_features = 64
    for i in range(n_layers):
        out_features = trial.suggest_int("n_units_l{}".format(i), 8, 128)
        layers.append(nn.Linear(in_features, out_features))
        layers.append(nn.ReLU())
        p = trial.suggest_float("dropout_l{}".format(i), 0.0, 0.5)
        layers.append(nn.Dropout(p))
        in_features = out_features
    layers.append(nn.Linear(in_features, CLASSES))
    layers.append(nn.LogSoftmax(dim=1))
    return nn.Sequential(*layers)


def get_digits():
    digits = sklearn.datasets.load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    return sklearn.model_selection.train_test_split(x, y, test_size=0.25, random_state=0)


def objective(trial):
    model = define_model(trial).to(DEVICE)

    optimizer_name = trial.suggest_categorical("optimizer", ["Adam", "RMSprop", "SGD"])
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    optimizer = getattr(optim, optimizer_name)(model.parameters(), lr=lr)

    train_x, valid_x, train_y, valid_y = get_digits()

    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(train_x))[:N_TRAIN_EXAMPLES]
        for start in range(0, len(order), BATCHSIZE):
            batch = order[start : start + BATCHSIZE]
            optimizer.zero_grad()
            loss = F.nll_loss(model(train_x[batch]), train_y[batch])
            loss.backward()
            optimizer.step()

        model.eval()
        with torch.no_grad():
            pred = model(valid_x).argmax(dim=1)
        accuracy = (pred == valid_y).float().mean().item()

        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.exceptions.TrialPruned()

    return accuracy


if __name__ == "__main__":
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=100, timeout=600)

    pruned_trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.PRUNED])
    complete_trials = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])

    print("Study statistics: ")
    print("  Number of finished trials: ", len(study.trials))
    print("  Number of pruned trials: ", len(pruned_trials))
    print("  Number of complete trials: ", len(complete_trials))

    print("Best trial:")
    trial = study.best_trial
    print("  Value: ", trial.value)
    print("  Params: ")
    for key, value in trial.params.items():
        print("    {}: {}".format(key, value))
