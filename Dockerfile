FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY moonq ./moonq
COPY api ./api
COPY worker ./worker
RUN pip install . && useradd --system --no-create-home moonq

USER moonq
EXPOSE 8000
CMD ["moonq", "api", "--host", "0.0.0.0", "--port", "8000"]
