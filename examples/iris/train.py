"""Train the iris classifier the example endpoint serves, and write a CSV to score.

    .venv/bin/python examples/iris/train.py
"""

from __future__ import annotations

import argparse
import csv
import pickle
from pathlib import Path

from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

HERE = Path(__file__).resolve().parent
FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "model.pkl")
    parser.add_argument("--csv", type=Path, default=HERE / "iris.csv")
    args = parser.parse_args()

    iris = load_iris()
    model = LogisticRegression(max_iter=1000, random_state=0)
    model.fit(iris.data, iris.target)
    bundle = {"model": model, "labels": [str(name) for name in iris.target_names],
              "features": FEATURES}
    args.out.write_bytes(pickle.dumps(bundle))
    with args.csv.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(FEATURES)
        writer.writerows(row.tolist() for row in iris.data)
    print(f"training accuracy {model.score(iris.data, iris.target):.3f}; "
          f"model: {args.out}; data: {args.csv} ({len(iris.data)} rows)")


if __name__ == "__main__":
    main()
