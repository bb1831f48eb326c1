{{/* Names and labels. */}}
{{- define "kvmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{/* 40, not 63: KubeRay derives longer names (cluster, services, pods) from the RayService's. */}}

{{- define "kvmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kvmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kvmesh.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "kvmesh.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "kvmesh.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}
{{- .Values.redis.externalUrl -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "kvmesh.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The kvmesh deployment config (router/config.py) embedded in the Serve config: the user's
.Values.kvmesh plus what the chart owns (Redis URL, where the API keys come from, HTTP).
*/}}
{{- define "kvmesh.deploymentConfig" -}}
{{- $cfg := deepCopy .Values.kvmesh -}}
{{- $redis := include "kvmesh.redisUrl" . -}}
{{- if $redis }}{{ $_ := set $cfg "redis_url" $redis }}{{ end -}}
{{- $_ := set $cfg "auth" (dict "api_keys_env" .Values.apiKeys.secretKey) -}}
{{- $_ := set $cfg "http" (dict "host" "0.0.0.0" "port" 8000) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The RayService's serveConfigV2: one application built by cluster/serve_app.py. */}}
{{- define "kvmesh.serveConfig" -}}
{{- $app := dict "name" .Values.kvmesh.name "route_prefix" "/" "import_path" "cluster.serve_app:app_builder" "args" (dict "config" (include "kvmesh.deploymentConfig" . | fromYaml)) -}}
{{- $serve := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $serve -}}
{{- end -}}

{{/*
Checks values.schema.json cannot express; each fails the render with what to change.
  - GPUs per worker pod must be a multiple of each pool's tensor_parallel_size: a replica's
    TP group shares one node (engine/executor_ray.py places it STRICT_PACK / PACK).
  - The worker groups at their maxReplicas must hold the minimum replicas' GPUs.
  - A CUDA engine needs worker groups with GPUs.
*/}}
{{- define "kvmesh.validate" -}}
{{- $cfg := .Values.kvmesh -}}
{{- if not $cfg.model -}}
{{- fail "kvmesh.model is required: the built-in kvmesh-tiny or a model folder inside the pods (e.g. /models/Llama-3.1-8B-Instruct)" -}}
{{- end -}}
{{- if and .Values.redis.enabled .Values.redis.externalUrl -}}
{{- fail "redis: set either redis.enabled (a Redis in this release) or redis.externalUrl, not both" -}}
{{- end -}}
{{- $engine := $cfg.engine | default dict -}}
{{- $device := toString ($engine.device | default "auto") -}}
{{- $pools := list -}}
{{- $dis := $cfg.disaggregation | default dict -}}
{{- if eq (toString ($dis.mode | default "colocated")) "colocated" -}}
{{- $r := $cfg.replicas | default dict -}}
{{- $pools = append $pools (dict "name" "kvmesh.replicas" "tp" (int ($engine.tensor_parallel_size | default 1)) "pp" (int ($engine.pipeline_parallel_size | default 1)) "min" (int ($r.min_replicas | default 1)) "gpus" (float64 ($r.num_gpus | default 0))) -}}
{{- else -}}
{{- range $poolName := list "prefill" "decode" -}}
{{- $p := get $dis $poolName | default dict -}}
{{- $r := $p.replicas | default dict -}}
{{- $pools = append $pools (dict "name" (printf "kvmesh.disaggregation.%s" $poolName) "tp" (int ($p.tensor_parallel_size | default 1)) "pp" (int ($p.pipeline_parallel_size | default 1)) "min" (int ($r.min_replicas | default 1)) "gpus" (float64 ($r.num_gpus | default 0))) -}}
{{- end -}}
{{- end -}}
{{- $capacity := 0 -}}
{{- range .Values.workerGroups -}}
{{- $capacity = add $capacity (mul (int .maxReplicas) (int (.gpus | default 0))) -}}
{{- end -}}
{{- if and (hasPrefix "cuda" $device) (eq (int $capacity) 0) -}}
{{- fail (printf "kvmesh.engine.device is %q but no workerGroups entry has gpus > 0: give the GPU worker group(s) gpus: N" $device) -}}
{{- end -}}
{{- $isGpu := or (hasPrefix "cuda" $device) (and (eq $device "auto") (gt (int $capacity) 0)) -}}
{{- $needed := 0.0 -}}
{{- range $pool := $pools -}}
{{- $workers := mul $pool.tp $pool.pp -}}
{{- $perReplica := $pool.gpus -}}
{{- if and $isGpu (gt (int $workers) 1) -}}
{{- $perReplica = float64 $workers -}}
{{- range $i, $g := $.Values.workerGroups -}}
{{- $gpus := int ($g.gpus | default 0) -}}
{{- if and (gt $gpus 0) (ne (mod $gpus $pool.tp) 0) -}}
{{- fail (printf "workerGroups[%d] (%s) has gpus: %d per pod, but %s uses tensor_parallel_size=%d (pipeline_parallel_size=%d): a replica's tensor-parallel group must fit on one pod, so gpus per pod must be a multiple of %d" $i $g.name $gpus $pool.name $pool.tp $pool.pp $pool.tp) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $needed = addf $needed (mulf $pool.min $perReplica) -}}
{{- end -}}
{{- if and $isGpu (gt $needed (float64 $capacity)) -}}
{{- fail (printf "the workerGroups hold at most %d GPUs (sum of maxReplicas x gpus), but the minimum replicas need %v (min_replicas x tensor_parallel_size x pipeline_parallel_size per pool)" (int $capacity) $needed) -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Ray container. */}}
{{- define "kvmesh.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with include "kvmesh.apiKeysSecret" . }}
- name: {{ $.Values.apiKeys.secretKey }}
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.apiKeys.secretKey }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}
