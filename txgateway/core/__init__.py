"""The request's path, knowing no feature: the context, the filter contract and its runner, routes, ids, deadlines, fast writes, the lean loop."""
