"""Moving a finished prefill's KV to the decode instance that continues the request."""
