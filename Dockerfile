# RLHF Studio: one image for the web server (gunicorn) and the Celery workers.
#   docker build -t rlhf-studio .          # torch from PyPI (its Linux x86_64 wheels carry CUDA)
#   docker build -t rlhf-studio --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .  # CPU-only, smaller
# Every other dependency comes from requirements.lock, exact versions checked against their hashes.
FROM python:3.11-slim

# var/ (collected static files) stays in the image; checkpoints, base models and the
# Hugging Face cache live on the /data volume that the web server and workers share.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VAR_DIR=/app/var \
    CHECKPOINT_DIR=/data/checkpoints \
    DEFAULT_BASE_MODEL=/data/models/tiny-lm \
    HF_HOME=/data/hf

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""

RUN useradd --create-home --uid 10001 studio
WORKDIR /app

COPY pyproject.toml requirements.lock README.md* ./
COPY config ./config
COPY labeling ./labeling
COPY training ./training
COPY rlhf ./rlhf
RUN pip install --require-hashes --no-deps -r requirements.lock \
    && if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" "$TORCH_SPEC"; else pip install "$TORCH_SPEC"; fi \
    && pip install --no-deps . \
    && pip check

COPY manage.py ./
COPY templates ./templates
COPY static ./static
# collectstatic needs a SECRET_KEY to import the settings; this one is thrown away with the layer.
RUN SECRET_KEY=collectstatic-only DEBUG=0 ALLOWED_HOSTS=localhost CACHE_REDIS=0 python manage.py collectstatic --noinput \
    && mkdir -p /data/checkpoints /data/models /data/hf && chown -R studio:studio /data /app/var

USER studio
VOLUME ["/data"]
EXPOSE 8000
CMD ["gunicorn", "config.wsgi", "--bind", "0.0.0.0:8000", "--workers", "3", "--access-logfile", "-"]
