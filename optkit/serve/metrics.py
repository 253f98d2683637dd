"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Gauges are read from the scheduler at scrape time; the scheduler observes the histograms and
counters as tokens are generated.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, prefix: str = "optkit"):
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge(f"{prefix}_queue_depth",
                                 "sequences waiting (queued or preempted)", registry=r)
        self.running = Gauge(f"{prefix}_running_sequences", "sequences holding KV blocks",
                             registry=r)
        self.free_slots = Gauge(f"{prefix}_free_slots",
                                "sequences that may still start (max_num_seqs - running)",
                                registry=r)
        self.blocks_used = Gauge(f"{prefix}_kv_blocks_used", "KV-cache blocks held",
                                 registry=r)
        self.blocks_free = Gauge(f"{prefix}_kv_blocks_free",
                                 "KV-cache blocks free or only cached", registry=r)
        self.cache_tokens = Gauge(f"{prefix}_cache_tokens", "KV-cache positions in use",
                                  registry=r)
        self.cache_usage = Gauge(f"{prefix}_cache_usage_ratio",
                                 "fraction of KV-cache positions in use", registry=r)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds",
                              "submit to first generated token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram(f"{prefix}_time_per_output_token_seconds",
                              "time between generated tokens", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.e2e = Histogram(f"{prefix}_request_latency_seconds",
                             "submit to finish (completed sequences)", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.prompt_tokens = Counter(f"{prefix}_prompt_tokens", "prompt tokens prefilled",
                                     registry=r)
        self.generation_tokens = Counter(f"{prefix}_generation_tokens", "tokens generated",
                                         registry=r)
        self.prefix_queries = Counter(f"{prefix}_prefix_cache_queries",
                                      "prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter(f"{prefix}_prefix_cache_hits",
                                   "prompt tokens found in the prefix cache", registry=r)
        self.preemptions = Counter(f"{prefix}_preemptions",
                                   "sequences preempted (blocks freed, recomputed later)",
                                   registry=r)
        self.finished = Counter(f"{prefix}_sequences_finished", "finished sequences",
                                ["reason"], registry=r)
        self.rejected = Counter(f"{prefix}_requests_rejected", "requests refused",
                                ["reason"], registry=r)

    def bind(self, scheduler) -> Metrics:
        """Read the gauges from ``scheduler.stats()`` at scrape time."""
        def stat(name):
            return lambda: scheduler.stats()[name]

        self.queue_depth.set_function(stat("waiting"))
        self.running.set_function(stat("running"))
        self.free_slots.set_function(stat("free_slots"))
        self.cache_tokens.set_function(stat("cache_tokens"))
        self.blocks_used.set_function(stat("blocks_used"))
        self.blocks_free.set_function(stat("blocks_free"))

        def usage():
            s = scheduler.stats()
            return s["cache_tokens"] / max(s["cache_capacity"], 1)

        self.cache_usage.set_function(usage)
        return self

    def render(self) -> bytes:
        return generate_latest(self.registry)
