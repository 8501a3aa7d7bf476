#!/usr/bin/env python3
"""Where wave attention's error comes from, on captured real queries and KV caches.

Capture one case per directory with the CPU backend, full attention only, for example:

    RETROWAVE_CAPTURE_QK=/tmp/cap/mv4k-1 retrowave eval --tasks multi-value --lengths 4096 \
        --cases 1 --seed 7001 --attention full --out /tmp/cap/mv4k-1/eval.jsonl

then `python3 bench/analysis/wave_rank_study.py /tmp/cap/mv4k-*`. For every layer, KV head and
every `--stride`-th decode step, the prompt's keys are clustered as `retrowave_index::kmeans`
does (spherical k-means of the mean-centred keys, centroids spread evenly over the tokens at the
start, raw-key means as centroids), and each way of choosing the retrieval clusters is scored
against exact attention over the same tokens:

rankings (which `r` clusters are attended exactly)
  centroid      the method's: the GQA group's summed softmax over `q . c_i`
  size          the same with `ln |C_i|` added (`rank_by_size`)
  lognorm-iso   `q . c_i + |q|^2 s_i^2 / 2`, s_i the cluster's key spread per dimension
  lognorm-cov   `q . c_i + q' S_i q / 2`, S_i the cluster's key covariance
  quest         the per-dimension min/max bound of Quest
  maxlogit      the largest exact `q . k` in the cluster (needs every cluster's keys)
  rerank-M      the method's ranking, then its best M x r clusters re-ranked by their largest
                exact `q . k` (reads the keys of M x r clusters)
  oracle        the clusters' true attention mass (the best any ranking can do)
  union         each query head's own best clusters by `q . c_i`, taken in turn from the heads
                of the group (round robin) until `r` are chosen, instead of one summed score
                (the first version of `union_ranking`)
  quota         each query head's own best floor(r / G) clusters by `q . c_i` (G the group),
                the rest of the `r` by the summed score
  maxp          the largest of the heads' softmax probabilities instead of their sum
  maxrel        the largest over the heads of `q . c_i` less the head's best `q . c_j`
  minrank       the union of each head's best k clusters by `q . c_i`, k as large as `r`
                allows (clusters ordered by their best rank in any head, ties by head): what
                `union_ranking` does now
estimations (what stands for the clusters not attended exactly)
  none          nothing (they are dropped)
  default       the next `e` clusters by rank, as `|C_i|` copies of the centroid with the mean
                value (the method's)
  rest          every cluster not retrieved, the same way
  truemass      every cluster not retrieved, with its true mass and its mean value (the best an
                estimate from mean values can do)

Printed per (ranking, estimation, r): the attention mass attended exactly (steady zone and
retrieval clusters), and the relative L2 error of the attention output against exact attention,
mean, 95th percentile, in layer 0, and the share of query-head outputs that are lost (error above
0.5: a head whose attention sits on a token of a cluster ranked too low, e.g. one key far from
its cluster's centroid). Sink 4 and window 64 tokens as the defaults; the estimation
budget `e` is 23.2% of the clusters (published).
"""
import argparse
import glob

import numpy as np

SINK, WINDOW = 4, 64


def load(d):
    n, nkv, nh, hd = map(int, open(f"{d}/meta.txt").read().split())
    layers = []
    for l in range(len(glob.glob(f"{d}/kv_L*.bin"))):
        kv = np.fromfile(f"{d}/kv_L{l}.bin", dtype=np.float32)
        k = kv[: nkv * n * hd].reshape(nkv, n, hd)
        v = kv[nkv * n * hd:].reshape(nkv, n, hd)
        q = np.fromfile(f"{d}/q_L{l}.bin", dtype=np.float32).reshape(-1, nh, hd)
        layers.append((k, v, q))
    return n, nkv, nh, hd, layers


def kmeans(x, k, iterations):
    c = x - x.mean(0)
    n = len(x)
    cen = c[[j * n // k for j in range(k)]].copy()
    cen /= np.linalg.norm(cen, axis=1, keepdims=True) + 1e-30
    for _ in range(iterations):
        a = np.argmax(c @ cen.T, axis=1)
        for j in range(k):
            m = a == j
            if m.any():
                s = c[m].sum(0)
                cen[j] = s / (np.linalg.norm(s) + 1e-30)
    return np.argmax(c @ cen.T, axis=1)


def group_softmax_sum(x, nonempty):
    x = np.where(nonempty, x, -np.inf)
    x = x - x.max(1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(1, keepdims=True)).sum(0)


def group_max_softmax(x, nonempty):
    x = np.where(nonempty, x, -np.inf)
    x = x - x.max(1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(1, keepdims=True)).max(0)


def union_ranking(clog, nonempty, r, tie):
    """A score whose best `r` are the round-robin union of each head's own best clusters by
    centroid logit (ties and the rest ordered by `tie`)."""
    orders = np.argsort(-np.where(nonempty, clog, -np.inf), axis=1, kind="stable")
    chosen, seen, i = [], set(), 0
    want = min(r, int(nonempty.sum()))
    while len(chosen) < want:
        for row in orders:
            c = row[i]
            if nonempty[c] and c not in seen:
                seen.add(c)
                chosen.append(c)
                if len(chosen) == want:
                    break
        i += 1
    score = tie.copy()
    top = np.abs(tie[np.isfinite(tie)]).max() + 1.0
    score[chosen] = top + (want - np.arange(want))  # the round-robin order
    return score


def quota_ranking(clog, nonempty, r, tie):
    """A score whose best `r` hold each head's own best floor(r / G) clusters by centroid logit,
    then the rest by `tie` (the summed score)."""
    g = clog.shape[0]
    k = r // g
    score = tie.copy()
    if k == 0:
        return score
    x = np.where(nonempty, clog, -np.inf)
    top = np.abs(tie[np.isfinite(tie)]).max() + 1.0
    for row in x:
        thr = np.sort(row)[::-1][min(k, int(nonempty.sum())) - 1]
        chosen = nonempty & (row >= thr)
        score[chosen] = np.where(score[chosen] >= top, score[chosen], score[chosen] + top)
    return score


def minrank_ranking(clog, nonempty, r, tie):
    """A score whose best `r` are the clusters of smallest best rank over the heads (rank * G +
    head), i.e. the union of each head's best k, k as large as `r` allows."""
    g, n = clog.shape
    orders = np.argsort(-np.where(nonempty, clog, -np.inf), axis=1, kind="stable")
    key = np.full(n, np.inf)
    for h, row in enumerate(orders):
        rank = np.empty(n)
        rank[row] = np.arange(n)
        key = np.minimum(key, rank * g + h)
    want = min(r, int(nonempty.sum()))
    chosen = np.argsort(key, kind="stable")[:want]
    score = tie.copy()
    top = np.abs(tie[np.isfinite(tie)]).max() + 1.0
    score[chosen] = top + (want - np.arange(want))
    return score


def study(d, budgets, avg, iterations, stride, est_fraction, rerank=()):
    n, nkv, nh, hd, layers = load(d)
    prompt = n - 1
    g = nh // nkv
    idx = np.arange(SINK, prompt - WINDOW)
    steady = np.setdiff1d(np.arange(n), idx)
    k = len(idx) // avg
    est = int(est_fraction * k)
    out = {}
    for l, (K, V, q) in enumerate(layers):
        for h in range(nkv):
            kh, vh = K[h].astype(np.float64), V[h].astype(np.float64)
            a = kmeans(kh[idx].astype(np.float32), k, iterations)
            sizes = np.bincount(a, minlength=k)
            ne = sizes > 0
            cen = np.zeros((k, hd))
            vm = np.zeros((k, hd))
            np.add.at(cen, a, kh[idx])
            np.add.at(vm, a, vh[idx])
            cen[ne] /= sizes[ne, None]
            vm[ne] /= sizes[ne, None]
            kmin = np.full((k, hd), np.inf)
            kmax = np.full((k, hd), -np.inf)
            np.minimum.at(kmin, a, kh[idx])
            np.maximum.at(kmax, a, kh[idx])
            dev = kh[idx] - cen[a]
            var_iso = np.zeros(k)
            np.add.at(var_iso, a, (dev ** 2).sum(1))
            var_iso[ne] /= sizes[ne] * hd
            cov = np.zeros((k, hd, hd))
            np.add.at(cov, a, dev[:, :, None] * dev[:, None, :])
            cov[ne] /= sizes[ne, None, None]
            for t in range(0, q.shape[0], stride):
                qs = q[t, h * g:(h + 1) * g].astype(np.float64) / np.sqrt(hd)
                lg = qs @ kh.T
                m = lg.max(1, keepdims=True)
                w = np.exp(lg - m)
                z = w.sum(1, keepdims=True)
                p = w / z
                o_true = p @ vh
                mass = np.zeros((g, k))
                np.add.at(mass.T, a, p[:, idx].T)
                log_mass = np.log(np.maximum(mass, 1e-300)) + np.log(z) + m
                clog = qs @ cen.T
                maxlogit = np.full((g, k), -np.inf)
                np.maximum.at(maxlogit.T, a, lg[:, idx].T)
                rankings = {
                    "centroid": group_softmax_sum(clog, ne),
                    "size": group_softmax_sum(clog + np.log(np.maximum(sizes, 1)), ne),
                    "lognorm-iso": group_softmax_sum(clog + 0.5 * var_iso[None] * (qs ** 2).sum(1, keepdims=True), ne),
                    "lognorm-cov": group_softmax_sum(clog + 0.5 * np.einsum("gd,kde,ge->gk", qs, cov, qs), ne),
                    "quest": group_softmax_sum(np.maximum(qs[:, None] * kmin[None], qs[:, None] * kmax[None]).sum(2), ne),
                    "maxlogit": group_softmax_sum(maxlogit, ne),
                    "oracle": mass.sum(0),
                    "maxp": group_max_softmax(clog, ne),
                    "maxrel": np.where(ne, (clog - clog[:, ne].max(1, keepdims=True)).max(0), -np.inf),
                }
                per_r = {
                    "union": union_ranking,
                    "quota": quota_ranking,
                    "minrank": minrank_ranking,
                }
                ml = rankings["maxlogit"]
                for mult in rerank:
                    base = rankings["centroid"]
                    cand = np.argsort(-base, kind="stable")
                    s = base.copy() - 2.0 * base.max() - 1.0  # below every candidate
                    s[cand[: mult * budgets[0]]] = ml[cand[: mult * budgets[0]]]
                    rankings[f"rerank-{mult}"] = s
                for r in budgets:
                    at_r = dict(rankings)
                    for name, f in per_r.items():
                        at_r[name] = f(clog, ne, r, rankings["centroid"])
                    for name, score in at_r.items():
                        order = np.argsort(-score, kind="stable")
                        exact = np.concatenate([steady, idx[np.isin(a, order[:r])]])
                        covered = p[:, exact].sum(1).mean()
                        for ev in ("none", "default", "rest", "truemass"):
                            if ev == "none":
                                es = order[:0]
                            elif ev == "default":
                                es = order[r:r + est]
                            else:
                                es = order[r:]
                            es = es[ne[es]]
                            if ev == "truemass":
                                le = log_mass[:, es]
                            else:
                                le = clog[:, es] + np.log(sizes[es])[None]
                            lx = lg[:, exact]
                            mm = lx.max(1)
                            if len(es):
                                mm = np.maximum(mm, le.max(1))
                            wx = np.exp(lx - mm[:, None])
                            we = np.exp(le - mm[:, None])
                            o = (wx @ vh[exact] + we @ vm[es]) / (wx.sum(1) + we.sum(1))[:, None]
                            err = np.linalg.norm(o - o_true, axis=1) / np.linalg.norm(o_true, axis=1)
                            out.setdefault((name, ev, r), []).append(
                                (covered, err.mean(), l, (err > 0.5).mean()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--budgets", default="32,64,128", help="retrieval clusters, comma-separated")
    ap.add_argument("--avg-cluster-size", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=9)
    ap.add_argument("--stride", type=int, default=4, help="study every N-th decode step")
    ap.add_argument("--estimation-fraction", type=float, default=0.232)
    ap.add_argument("--rerank", default="", help="re-ranking multiples M to study (candidates: M x the first budget), comma-separated")
    args = ap.parse_args()
    budgets = [int(x) for x in args.budgets.split(",")]
    rows = {}
    for d in args.dirs:
        rerank = [int(x) for x in args.rerank.split(",") if x]
        for key, v in study(d, budgets, args.avg_cluster_size, args.iterations, args.stride,
                            args.estimation_fraction, rerank).items():
            rows.setdefault(key, []).extend(v)
    print("| r | ranking | estimation | exact mass | rel. error, mean | p95 | layer 0 | outputs lost |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, ev, r) in sorted(rows, key=lambda k: (k[2], k[1], k[0])):
        v = np.array(rows[(name, ev, r)])
        print(f"| {r} | {name} | {ev} | {v[:, 0].mean():.4f} | {v[:, 1].mean():.4f} | "
              f"{np.percentile(v[:, 1], 95):.4f} | {v[v[:, 2] == 0, 1].mean():.4f} | "
              f"{v[:, 3].mean() * 1e4:.1f}e-4 |")


if __name__ == "__main__":
    main()
