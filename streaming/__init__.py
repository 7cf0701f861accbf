"""A StreamingLLM sink cache: the first tokens (found by the shared detector) plus a recent window, for long chats and video streams."""
