"""How many requests can run per engine step when adapters outnumber slots: a simulation.

    python3 bench/admission_sim.py [--clients 16] [--adapters 16] [--slots 4]

Closed loop as in the multi-LoRA benchmark: every client sends a request for a random adapter and
sends the next when it ends. A request runs only while its adapter holds one of the slots, and an
adapter keeps its slot while any of its requests runs. When a slot frees, one waiting adapter takes
it: "oldest" is vLLM's scheduler (the oldest waiting request's adapter), "most waiting" is
lorafleet's residency (most waiting requests first, an adapter passed over 4 x slots times first).
Prints the share of the clients running per step (1.00 = base-only) and the waits in request
durations. Step cost is taken as independent of batch size, as in GPU decoding at these sizes."""

import argparse
import collections
import random


def simulate(rule: str, clients: int, adapters: int, slots: int, steps: int, seed: int, length: int = 256):
    rng = random.Random(seed)
    waiting = [(0, rng.randrange(adapters)) for _ in range(clients)]  # (since, adapter), oldest first
    running, passes, waits, busy = [], collections.Counter(), [], 0
    for step in range(steps):
        held = {adapter for _, adapter in running}
        counts = collections.Counter(adapter for _, adapter in waiting)
        while len(held) < slots and (line := [a for a in dict.fromkeys(a for _, a in waiting) if a not in held]):
            if rule == "oldest":
                chosen = line[0]
            else:
                chosen = max(line, key=lambda a: (passes[a] >= 4 * slots, counts[a]))
            held.add(chosen)
            passes.pop(chosen, None)
            passes.update(a for a in line if a != chosen)
        waits += [(step - since) / length for since, adapter in waiting if adapter in held]
        running += [[length, adapter] for _, adapter in waiting if adapter in held]
        waiting = [(since, adapter) for since, adapter in waiting if adapter not in held]
        busy += len(running)
        for request in running:
            request[0] -= 1
        waiting += [(step, rng.randrange(adapters)) for left, _ in running if left == 0]
        running = [request for request in running if request[0] > 0]
    waits.sort()
    return busy / steps / clients, waits[len(waits) // 2], waits[int(0.99 * len(waits))], waits[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200_000)
    args = parser.parse_args()
    print("| rule | running / clients | wait p50 | wait p99 | wait max |\n|---|---|---|---|---|")
    for rule in ("oldest", "most waiting"):
        share, p50, p99, worst = simulate(rule, args.clients, args.adapters, args.slots, args.steps, seed=0)
        print(f"| {rule} | {share:.3f} | {p50:.2f} | {p99:.2f} | {worst:.2f} |")


if __name__ == "__main__":
    main()
