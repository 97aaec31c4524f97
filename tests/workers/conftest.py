from tests.service.fixtures import redis_url  # noqa: F401  (session fixture)
