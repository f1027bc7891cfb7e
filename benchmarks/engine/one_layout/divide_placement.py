import time, statistics, torch, torch.distributed as dist
dist.init_process_group("gloo"); torch.set_num_threads(1)
for n_mb, nb in ((144, 6), (36, 2)):
    n = n_mb * 2**20 // 4
    buf = torch.randn(n); cuts = [buf[i * n // nb:(i + 1) * n // nb] for i in range(nb)]
    def once_div():
        ws = [dist.all_reduce(c, async_op=True) for c in cuts]
        for w in ws: w.wait()
        buf.div_(2)
    def per_bucket_div():
        ws = [dist.all_reduce(c, async_op=True) for c in cuts]
        for c, w in zip(cuts, ws): w.wait(); c.div_(2)
    def avg():
        ws = [dist.all_reduce(c, dist.ReduceOp.AVG, async_op=True) for c in cuts]
        for w in ws: w.wait()
    def flat():
        dist.all_reduce(buf)
    fns = {"flat": flat, "once_div": once_div, "per_bucket_div": per_bucket_div, "avg": avg}
    t = {k: [] for k in fns}
    for r in range(14):
        for k, f in fns.items():
            dist.barrier(); t0 = time.perf_counter(); f(); dt = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(dt, dist.ReduceOp.MAX)
            if r >= 2: t[k].append(dt.item())
    if dist.get_rank() == 0:
        base = statistics.median(t["flat"])
        print(n_mb, "MB", nb, "buckets:", {k: round(statistics.median(v) / base, 3) for k, v in t.items()}, f"flat {base*1e3:.1f} ms")
