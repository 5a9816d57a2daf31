"""The JetStream store (`OO_STATE=nats`): the same ports as `stores.sqlite`, on KV buckets
and streams that several replicas share (ADR 0018).

    kv          bucket setup, key encoding and the compare-and-set loop
    scoring     models, the decision log, rewards, off-policy sums (the `Store` port)
    profiles    profile features, task context and the event-dedupe record (`ProfileStore`)
    profile_doc one user's profile document: the value `profiles` compares and sets
"""
