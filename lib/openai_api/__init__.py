"""The OpenAI-compatible Images API (``POST /v1/images/generations``): its request and response
shapes, their translation to and from sealserve's own, its stream events and its error body."""
