FROM python:3.8.18-slim
RUN apt-get update && apt-get install -y git build-essential curl && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace
COPY . /workspace
ENV ALPHA="a \"quoted\" \$HOME \\ value"
ENV MID="with spaces"
ENV ZED="last"
RUN pip install -r requirements.txt
RUN pip install -e .
