"""Operations on a deployed fleet: preflight, smoke test, key rotation (boto3, openai)."""
