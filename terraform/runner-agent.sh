#!/bin/bash
# kiln runner agent, one per runner instance (installed by runner-user-data.sh.tftpl).
#
# Every few seconds:
# - Scale-in protection follows the runner's work: on while kiln_runner_in_flight > 0 (from
#   the runner's /metrics), off when it is 0, so the group's scale-in only picks idle runners.
# - When the instance's target lifecycle state turns Terminated (the group's termination hook
#   holds it in Terminating:Wait), it stops the runner unit: docker sends SIGTERM, the runner
#   stops taking jobs, finishes its renders within KILN_SHUTDOWN_DEADLINE_SECS and hands any
#   left back to the queue; then it completes the lifecycle action and the instance goes.
# - Once a minute it publishes GPU utilisation, GPU memory use and jobs in flight (namespace
#   kiln, per group) for the dashboard.
# - A runner that has not answered /healthz for 10 minutes after a 20-minute start-up grace
#   marks the instance unhealthy, and the group replaces it.
#
# KILN_IMDS_URL and the KILN_AGENT_* timings exist for tests/runner_agent.rs, which runs this
# script against a real runner with a stand-in metadata service and stand-ins of aws and systemctl.
set -uo pipefail

: "${AWS_REGION:?}" "${KILN_INSTANCE:?}" "${KILN_GROUP:?}" "${KILN_HOOK:?}" "${KILN_METRICS_URL:?}" "${KILN_UNIT:?}"
IMDS=${KILN_IMDS_URL:-http://169.254.169.254}
INTERVAL=${KILN_AGENT_INTERVAL:-5}
START_GRACE=${KILN_AGENT_START_GRACE:-1200}
UNHEALTHY_AFTER=${KILN_AGENT_UNHEALTHY_AFTER:-600}

log() { echo "kiln-agent: $*"; }

imds() {
  local token
  token=$(curl -sf --max-time 2 -X PUT "$IMDS/latest/api/token" -H 'X-aws-ec2-metadata-token-ttl-seconds: 60') || return 1
  curl -sf --max-time 2 -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/$1"
}

autoscaling() { aws autoscaling --region "$AWS_REGION" "$@"; }

# Jobs the runner holds, or -1 when it does not answer.
in_flight() {
  curl -sf --max-time 2 "$KILN_METRICS_URL/metrics" |
    awk '$1 == "kiln_runner_in_flight" { print int($2); found = 1 } END { if (!found) print -1 }'
}

drain() {
  log "instance is terminating: stopping the runner (SIGTERM, then its drain)"
  systemctl stop "$KILN_UNIT"
  log "runner stopped; completing the lifecycle action"
  for attempt in 1 2 3 4 5; do
    autoscaling complete-lifecycle-action --lifecycle-action-result CONTINUE \
      --lifecycle-hook-name "$KILN_HOOK" --auto-scaling-group-name "$KILN_GROUP" --instance-id "$KILN_INSTANCE" && exit 0
    sleep $((attempt * 5))
  done
  log "could not complete the lifecycle action; the hook's timeout will"
  exit 1
}

publish_metrics() {
  local jobs=$1 gpu memory
  gpu=$(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null | awk '{ s += $1; n++ } END { if (n) printf "%.1f", s / n }')
  memory=$(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits 2>/dev/null | awk -F', *' '{ u += $1; t += $2 } END { if (t) printf "%.1f", 100 * u / t }')
  local dims="Dimensions=[{Name=AutoScalingGroupName,Value=$KILN_GROUP}]"
  local data=()
  [ -n "$gpu" ] && data+=("MetricName=GPUUtilization,$dims,Value=$gpu,Unit=Percent")
  [ -n "$memory" ] && data+=("MetricName=GPUMemoryUtilization,$dims,Value=$memory,Unit=Percent")
  [ "$jobs" -ge 0 ] && data+=("MetricName=RunnerJobsInFlight,$dims,Value=$jobs,Unit=Count")
  [ ${#data[@]} -gt 0 ] && aws cloudwatch put-metric-data --region "$AWS_REGION" --namespace kiln --metric-data "${data[@]}" >/dev/null
}

started=$(date +%s)
last_healthy=$started
last_published=0
protected=unknown

while true; do
  if [ "$(imds autoscaling/target-lifecycle-state)" = "Terminated" ]; then
    drain
  fi

  jobs=$(in_flight)
  now=$(date +%s)
  if [ "$jobs" -gt 0 ] && [ "$protected" != yes ]; then
    autoscaling set-instance-protection --auto-scaling-group-name "$KILN_GROUP" --instance-ids "$KILN_INSTANCE" \
      --protected-from-scale-in && protected=yes && log "busy: protected from scale-in"
  elif [ "$jobs" -eq 0 ] && [ "$protected" != no ]; then
    autoscaling set-instance-protection --auto-scaling-group-name "$KILN_GROUP" --instance-ids "$KILN_INSTANCE" \
      --no-protected-from-scale-in && protected=no && log "idle: scale-in may take this instance"
  fi

  if curl -sf --max-time 2 "$KILN_METRICS_URL/healthz" >/dev/null; then
    last_healthy=$now
  elif [ $((now - started)) -gt $START_GRACE ] && [ $((now - last_healthy)) -gt $UNHEALTHY_AFTER ]; then
    log "the runner has not been healthy for $((now - last_healthy)) s: marking the instance unhealthy"
    autoscaling set-instance-health --instance-id "$KILN_INSTANCE" --health-status Unhealthy --no-should-respect-grace-period
  fi

  if [ $((now - last_published)) -ge 60 ]; then
    publish_metrics "$jobs" && last_published=$now
  fi
  sleep $INTERVAL
done
