#!/usr/bin/env bash
# scaling-signal: publishes this node's vLLM scaling gauges to CloudWatch and keeps the node out of
# Auto Scaling scale-in while its replicas have requests. Installed into the image as
# /usr/local/libexec/vllm-fleet/scaling-signal by install-node-tools.sh;
# vllm-fleet-scaling-signal.timer (rendered per stack by infra/scaling.py) runs it every
# SCALING_INTERVAL_S seconds. See docs/scaling.md.
#
# Why not the CloudWatch agent: one scrape of vLLM's /metrics and one PutMetricData call do the
# same, with the AWS CLI the image already carries, and can be tested end to end against moto.
#
# Each run:
#  1. learns once (cached in the run directory) this instance's id and its group, from the
#     instance metadata tag aws:autoscaling:groupName (launch templates enable metadata tags);
#  2. on a node that serves (not a gang worker), reads each replica's /metrics and publishes the
#     gauges in SCALING_METRICS, one sample per replica, to namespace SCALING_NAMESPACE, once per
#     dimension set in SCALING_DIMENSIONS (AutoScalingGroupName and/or Stack);
#  3. sums the running + waiting gauges over the replicas: busy means protected from scale-in,
#     idle means not; it calls SetInstanceProtection only when that changes (a gang head protects
#     every member of its gang: stopping any one of them stops the replica). A busy node lets go
#     once its group has wanted fewer instances than it has in service for
#     SCALING_RELEASE_AFTER_S: under steady load no node is ever idle, and the node AWS then picks
#     still drains through the termination lifecycle hook before it stops.
# A replica whose /metrics does not answer publishes nothing and leaves the protection as it was:
# a dead replica fails its health check, and health replacement ignores scale-in protection.
#
# Environment (set by the unit, from infra/scaling.py node_scaling_environment):
#   SCALING_REGION, SCALING_STACK, SCALING_NAMESPACE, SCALING_PORTS ("8000 8001"),
#   SCALING_GANG (true|false), SCALING_METRICS ("prometheus_name=cloudwatch_name=Unit ..."),
#   SCALING_RUNNING, SCALING_WAITING (prometheus names), SCALING_DIMENSIONS ("AutoScalingGroupName
#   Stack": one dimension set each, keys within a set joined by ","), SCALING_RELEASE_AFTER_S,
#   SCALING_MAX_IDS (SetInstanceProtection's limit), SCALING_PUBLISH_INTERVAL_S (publish at most
#   this often; the protection check runs at every tick).
# Tests only: VLLM_FLEET_RUN_DIR, VLLM_FLEET_IMDS, VLLM_FLEET_AWS_ENDPOINT_URL (the image's AWS
# CLI, 2.9, predates the CLI's own AWS_ENDPOINT_URL).
set -euo pipefail
umask 022

for name in SCALING_REGION SCALING_STACK SCALING_NAMESPACE SCALING_PORTS SCALING_GANG SCALING_METRICS \
  SCALING_RUNNING SCALING_WAITING SCALING_DIMENSIONS SCALING_RELEASE_AFTER_S SCALING_MAX_IDS \
  SCALING_PUBLISH_INTERVAL_S; do
  [[ -n ${!name:-} ]] || { printf 'scaling-signal: %s is not set\n' "$name" >&2; exit 1; }
done
read -r -a ports <<<"$SCALING_PORTS"
read -r -a metrics <<<"$SCALING_METRICS"
read -r -a dimension_sets <<<"$SCALING_DIMENSIONS"
readonly run_dir="${VLLM_FLEET_RUN_DIR:-/run/vllm-fleet}"
readonly imds="${VLLM_FLEET_IMDS:-http://169.254.169.254}"
readonly state_file="$run_dir/scale-in-protection"
readonly identity_file="$run_dir/scaling-identity.env"
readonly pending_file="$run_dir/scale-in-pending-since"
readonly published_file="$run_dir/scaling-published-at"
aws_opts=(--region "$SCALING_REGION" --output text)
[[ -z ${VLLM_FLEET_AWS_ENDPOINT_URL:-} ]] || aws_opts+=(--endpoint-url "$VLLM_FLEET_AWS_ENDPOINT_URL")

log() { printf 'scaling-signal: %s\n' "$*" >&2; }
die() {
  log "$*"
  exit 1
}

# Each file is written whole and renamed into place, and only when its content changes.
write_file() {
  local tmp
  tmp="$(mktemp "$run_dir/.$(basename "$1").XXXXXX")"
  cat >"$tmp"
  if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
    rm -f "$tmp"
    return 0
  fi
  chmod 0644 "$tmp"
  mv -f "$tmp" "$1"
}

imds_get() {
  local token
  token="$(curl -fsS --max-time 5 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$imds/latest/api/token")" ||
    return 1
  curl -fsS --max-time 5 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/$1"
}

mkdir -p "$run_dir"
instance_id="" asg=""
if [[ -f $identity_file ]]; then
  while IFS='=' read -r key value; do
    case "$key" in
      INSTANCE_ID) instance_id="$value" ;;
      ASG) asg="$value" ;;
    esac
  done <"$identity_file"
fi
if [[ -z $instance_id || -z $asg ]]; then
  instance_id="$(imds_get instance-id)" || die "instance-id not in instance metadata at $imds"
  asg="$(imds_get tags/instance/aws:autoscaling:groupName)" ||
    die "tag aws:autoscaling:groupName not in instance metadata (are instance metadata tags enabled?)"
fi
[[ $instance_id =~ ^i-[0-9a-f]{8,17}$ ]] || die "unexpected instance id '$instance_id'"
# Auto Scaling group names are printable ASCII; the fleet's are letters, digits, '.', '_', '-'.
[[ $asg =~ ^[A-Za-z0-9._:/-]{1,255}$ ]] || die "unexpected Auto Scaling group name '$asg'"
write_file "$identity_file" <<ENV
INSTANCE_ID=$instance_id
ASG=$asg
ENV

if [[ $SCALING_GANG == true && ! -f $run_dir/role.head ]]; then
  # A worker (or a node whose gang is still forming) has no API server and nothing to protect
  # or publish: the head does both for the whole gang.
  exit 0
fi

# One scrape per replica: the gauges as "name value" lines.
scrapes=()
for port in "${ports[@]}"; do
  if ! body="$(curl -fsS --max-time 3 "http://127.0.0.1:$port/metrics")"; then
    log "replica on port $port does not answer /metrics; nothing published, protection left as it was"
    exit 0
  fi
  scrapes+=("$(awk '$1 !~ /^#/ { split($1, name, "{"); sum[name[1]] += $NF }
    END { for (n in sum) printf "%s %.6f\n", n, sum[n] }' <<<"$body")")
done
value_of() { awk -v n="$1" '$1 == n { print $2; found = 1 } END { if (!found) print 0 }' <<<"$2"; }

# PutMetricData: one datum per gauge and dimension set, with one value per replica.
publish=true
if [[ -f $published_file ]] && (($(date +%s) - $(<"$published_file") < SCALING_PUBLISH_INTERVAL_S)); then
  publish=false
fi
data=""
for dims in "${dimension_sets[@]}"; do
  dimension_json=""
  IFS=',' read -r -a keys <<<"$dims"
  for key in "${keys[@]}"; do
    case "$key" in
      AutoScalingGroupName) value="$asg" ;;
      Stack) value="$SCALING_STACK" ;;
      *) die "unknown dimension '$key'" ;;
    esac
    dimension_json+="${dimension_json:+,}{\"Name\":\"$key\",\"Value\":\"$value\"}"
  done
  for metric in "${metrics[@]}"; do
    IFS='=' read -r prometheus_name cloudwatch_name unit <<<"$metric"
    values=""
    for scrape in "${scrapes[@]}"; do
      values+="${values:+,}$(value_of "$prometheus_name" "$scrape")"
    done
    data+="${data:+,}{\"MetricName\":\"$cloudwatch_name\",\"Dimensions\":[$dimension_json],\"Values\":[$values],\"Unit\":\"$unit\"}"
  done
done
if [[ $publish == true ]]; then
  if aws cloudwatch put-metric-data "${aws_opts[@]}" --namespace "$SCALING_NAMESPACE" --metric-data "[$data]"; then
    date +%s | write_file "$published_file"
  else
    log "PutMetricData to $SCALING_NAMESPACE failed; the protection check still runs"
  fi
fi

# Requests in vLLM (running + waiting) over all replicas of this node.
in_flight=0
for scrape in "${scrapes[@]}"; do
  count="$(awk -v a="$SCALING_RUNNING" -v b="$SCALING_WAITING" '
    $1 == a || $1 == b { sum += $2 } END { printf "%d\n", (sum > 0) ? sum + 0.5 : 0 }' <<<"$scrape")"
  in_flight=$((in_flight + count))
done

# Has the group wanted fewer instances than it has in service, and since when?
if ((in_flight > 0)); then
  read -r desired in_service < <(aws autoscaling describe-auto-scaling-groups "${aws_opts[@]}" \
    --auto-scaling-group-names "$asg" \
    --query "AutoScalingGroups[0].[DesiredCapacity, length(Instances[?LifecycleState=='InService'])]") ||
    die "cannot describe $asg"
  [[ $desired =~ ^[0-9]+$ && $in_service =~ ^[0-9]+$ ]] || die "unexpected group sizes '$desired' '$in_service'"
  if ((desired < in_service)); then
    [[ -f $pending_file ]] || date +%s | write_file "$pending_file"
    since="$(<"$pending_file")"
    if (($(date +%s) - since >= SCALING_RELEASE_AFTER_S)); then
      log "$asg has waited $(($(date +%s) - since)) s to scale in ($in_service in service, $desired desired): letting go"
      in_flight=0
    fi
  else
    rm -f "$pending_file"
  fi
fi

ids=("$instance_id")
if [[ $SCALING_GANG == true ]]; then
  read -r -a ids < <(aws autoscaling describe-auto-scaling-groups "${aws_opts[@]}" \
    --auto-scaling-group-names "$asg" \
    --query "AutoScalingGroups[0].Instances[?LifecycleState=='InService'].InstanceId") ||
    die "cannot list the members of $asg"
  if ((${#ids[@]} == 0)) || [[ ${ids[0]} == None ]]; then
    die "group $asg lists no in-service members"
  fi
fi
((${#ids[@]} <= SCALING_MAX_IDS)) || die "${#ids[@]} instances: SetInstanceProtection takes at most $SCALING_MAX_IDS"

if ((in_flight > 0)); then
  wanted="protected ${ids[*]}"
  flag=--protected-from-scale-in
else
  wanted="unprotected ${ids[*]}"
  flag=--no-protected-from-scale-in
fi
if [[ -f $state_file && "$(<"$state_file")" == "$wanted" ]]; then
  exit 0
fi
aws autoscaling set-instance-protection "${aws_opts[@]}" --auto-scaling-group-name "$asg" \
  --instance-ids "${ids[@]}" "$flag" >/dev/null || die "SetInstanceProtection ($flag) failed for ${ids[*]}"
printf '%s\n' "$wanted" | write_file "$state_file"
log "$in_flight request(s) in vLLM: ${wanted%% *} (${ids[*]})"
