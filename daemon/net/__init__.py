"""The HTTP edge: the fetcher (the only user of httpx), the SSRF guard, per-host limits, rate-limit policy."""
