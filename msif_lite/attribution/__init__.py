"""Attributing answers to documents (notebooks 06–08): the method registry, the
`Attributor` that runs any registered method, candidate retrieval and `msif-lite trace`."""
