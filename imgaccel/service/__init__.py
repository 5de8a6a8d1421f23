"""The push-triggered conversion service: events, rules, jobs, isolated workers, reconciler, webhooks, API."""
