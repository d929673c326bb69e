# Per-site quotas and sender pacing (pure policy, clock injected). Filled in by the quota issue;
# the network code will only ask this package for verdicts.
