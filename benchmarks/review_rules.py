"""What should "Accept all suggested" record? A cheap answer on cached features, before any retraining.

The review of trashnet6 as shipped gives the Lite0 features of every image and its copy and quality
issues (`--features FILE` keeps them for a second call). Then, per flip seed: 5% of the training
labels flipped at random, the review's label step (out-of-fold head, cleanlab flags, confident
thresholds), each candidate rule applied, and a head fitted on the result scores the test split:
the review's own head (C = 16 / images) and a weak penalty (C = 1) that memorises more of the noise.

    nice -n 19 python benchmarks/review_rules.py --features /tmp/lite0.pkl --seeds 2 \
        > benchmarks/results/review_rules.txt
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def features(file: str, dataset: str) -> dict:
    if file and Path(file).is_file():
        return pickle.loads(Path(file).read_bytes())
    from finetune_core.review import review_dataset

    feats: dict = {}
    result = review_dataset(ROOT.parent / "shared" / "datasets" / dataset, features_out=feats, kept=set())
    out = {"result": result.to_dict(), "features": feats}
    if file:
        Path(file).write_bytes(pickle.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="trashnet6")
    parser.add_argument("--features", default="", help="a pickle of the review's features (written when missing)")
    parser.add_argument("--seeds", type=int, default=4, help="flip seeds")
    args = parser.parse_args()
    d = features(args.features, args.dataset)
    from finetune_core.review import _head, _probabilities, label_issues, out_of_fold_probabilities, relabel_thresholds
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler


    f, res = d["features"], d["result"]
    X, y0, Xt, yt = f["train"], np.asarray(f["train_labels"]), f["test"], np.asarray(f["test_labels"])
    paths = list(f["train_paths"]); index = {p: i for i, p in enumerate(paths)}
    classes = res["classes"]; n, K = len(y0), len(classes)
    other = {}
    for i in res["issues"]:
        if i["split"] == "train" and i["kind"] != "label":
            other.setdefault(i["kind"], set()).add(index[i["path"]])
    print({k: len(v) for k, v in other.items()}, n, len(yt))
    copies = other.get("near_duplicate", set()) | other.get("exact_duplicate", set())
    quality = set().union(*[v for k, v in other.items() if k not in ("near_duplicate", "exact_duplicate")]) if other else set()

    heads = {"C=16/n": lambda m: _head(m), "C=1 (weak)": lambda m: make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=300))}
    def acc(labels, keep):
        return {h: float((_probabilities(mk(keep.sum()).fit(X[keep], labels[keep]), Xt, K).argmax(1) == yt).mean()) for h, mk in heads.items()}

    rules = {}
    def rule(name):
        def deco(fn):
            rules[name] = fn; return fn
        return deco
    # each rule: (y, flagged, sugg, conf, thr) -> (labels, keep)
    def base(y, drop_copies, drop_quality):
        keep = np.ones(n, bool)
        if drop_copies: keep[list(copies)] = False
        if drop_quality: keep[list(quality)] = False
        return y.copy(), keep
    def label_rule(mode, drop_copies, drop_quality):
        def fn(y, flagged, sugg, conf, thr, P):
            lab, keep = base(y, drop_copies, drop_quality)
            for i in np.flatnonzero(flagged):
                sure = conf[i] >= thr[sugg[i]]
                if mode == "relabel sure, exclude rest":
                    if sure: lab[i] = sugg[i]
                    else: keep[i] = False
                elif mode == "relabel sure, leave rest":
                    if sure: lab[i] = sugg[i]
                elif mode == "relabel all":
                    lab[i] = sugg[i]
                elif mode == "exclude all":
                    keep[i] = False
                elif mode == "relabel >=0.5, exclude rest":
                    if conf[i] >= 0.5: lab[i] = sugg[i]
                    else: keep[i] = False
            return lab, keep
        return fn
    rules["OLD relabel sure, exclude rest; copies+quality excluded"] = label_rule("relabel sure, exclude rest", True, True)
    for mode in ("relabel sure, exclude rest", "relabel sure, leave rest", "relabel all", "exclude all"):
        rules[f"{mode}; copies+quality kept"] = label_rule(mode, False, False)
    def broad(given_below, exclude_rest):
        def fn(y, flagged, sugg, conf, thr, P):
            lab, keep = y.copy(), np.ones(n, bool)
            given = P[np.arange(n), y]
            cand = (sugg != y) & (given < given_below)
            for i in np.flatnonzero(cand | flagged):
                if conf[i] >= thr[sugg[i]]:
                    lab[i] = sugg[i]
                elif exclude_rest and flagged[i]:
                    keep[i] = False
            return lab, keep
        return fn
    for gb in (0.1,):
        rules[f"broad: relabel sure where given < {gb}, exclude unsure flagged; copies kept"] = broad(gb, True)
        rules[f"broad: relabel sure where given < {gb}, leave the rest; copies kept"] = broad(gb, False)
    rules["nothing (flipped)"] = lambda y, *a: (y.copy(), np.ones(n, bool))

    seeds = range(args.seeds)
    table = {}
    clean = acc(y0, np.ones(n, bool))
    clean_nocopies = acc(*base(y0, True, True))
    print("clean", clean, "clean minus copies+quality", clean_nocopies, flush=True)
    for s in seeds:
        rng = np.random.default_rng(100 + s)
        y = y0.copy()
        idx = rng.choice(n, round(0.05 * n), replace=False)
        for i in idx:
            y[i] = rng.choice([c for c in range(K) if c != y0[i]])
        P = out_of_fold_probabilities(X, y, K)
        score, flagged = label_issues(y, P)
        sugg = P.argmax(1); conf = P[np.arange(n), sugg]
        thr = relabel_thresholds(y, P, list(range(K)))
        thr = {k: thr[k] for k in range(K)}
        for name, fn in rules.items():
            lab, keep = fn(y, flagged, sugg, conf, thr, P)
            a = acc(lab, keep)
            wrong = int((lab[keep] != y0[keep]).sum())
            table.setdefault(name, []).append((a, wrong, int((~keep).sum())))
        print("seed", s, "flagged", int(flagged.sum()), {k: v[-1] for k, v in table.items()}, flush=True)
    print()
    if not table:
        return
    for h in heads:
        print(f"== head {h}: clean {clean[h]:.4f}, clean minus copies+quality {clean_nocopies[h]:.4f}")
        base_f = np.mean([t[0][h] for t in table["nothing (flipped)"]])
        for name, rows in table.items():
            m = np.mean([t[0][h] for t in rows]); sd = np.std([t[0][h] - table["nothing (flipped)"][k][0][h] for k, t in enumerate(rows)])
            cost = clean[h] - base_f
            print(f"{name:70s} acc {m:.4f}  vs flipped {m - base_f:+.4f} (sd {sd:.4f})  share {((m - base_f) / cost if cost > 0 else float('nan')):+.0%}  wrong labels left {np.mean([t[1] for t in rows]):.0f} excluded {np.mean([t[2] for t in rows]):.0f}")


if __name__ == "__main__":
    main()
