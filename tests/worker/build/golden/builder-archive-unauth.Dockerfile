FROM python:3.8.18-slim
RUN for f in /etc/apt/sources.list /etc/apt/sources.list.d/*; do if [ -f "$f" ]; then sed -i -E -e 's#https?://[^ ]+/debian-security#http://archive.example.invalid/debian-security#g' -e 's#https?://[^ ]+/debian([ /]|$)#http://archive.example.invalid/debian\1#g' -e '/^deb(-src)? .*-updates/d' -e 's/^(Suites:.*) [a-z]+-updates/\1/' "$f"; fi; done; echo "Acquire::Check-Valid-Until \"false\"; Acquire::AllowInsecureRepositories \"true\"; APT::Get::AllowUnauthenticated \"true\";" > /etc/apt/apt.conf.d/99pfbuild-archive
RUN apt-get update && apt-get install -y --allow-unauthenticated git build-essential curl python3-dev libffi-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace
COPY . /workspace
ENV ALPHA="a \"quoted\" \$HOME \\ value"
ENV MID="with spaces"
ENV ZED="last"
RUN pip install -r requirements.txt
RUN pip install -e .
