{{/*
Names and labels.
*/}}
{{- define "fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fleet.labels" -}}
helm.sh/chart: {{ include "fleet.chart" . }}
{{ include "fleet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fleet
{{- end }}

{{/* The fleet nodes: labels select pods of component "node" only. */}}
{{- define "fleet.nodeSelectorLabels" -}}
{{ include "fleet.selectorLabels" . }}
app.kubernetes.io/component: node
{{- end }}

{{- define "fleet.nodeLabels" -}}
{{ include "fleet.labels" . }}
app.kubernetes.io/component: node
{{- end }}

{{- define "fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fleet.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "fleet.secretName" -}}
{{- include "fleet.fullname" . }}
{{- end }}

{{- define "fleet.trialRedisName" -}}
{{- printf "%s-redis" (include "fleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
True (non-empty) when the release runs the trial Redis: redis.trial.enabled=true, or
left at null while neither redis.url nor existingSecret names a Redis.
*/}}
{{- define "fleet.trialRedis" -}}
{{- $enabled := .Values.redis.trial.enabled }}
{{- if kindIs "invalid" $enabled }}
{{- if not (or .Values.redis.url .Values.existingSecret) }}true{{ end }}
{{- else if $enabled }}true{{ end }}
{{- end }}

{{/*
True (non-empty) when nothing says who may use fleet, so the chart makes up an API key
for the principal admin.
*/}}
{{- define "fleet.generatesApiKey" -}}
{{- if not (or .Values.auth.apiKeys .Values.existingSecret .Values.auth.allowUnauthenticated) }}true{{ end }}
{{- end }}

{{/*
The generated admin token: the one the release's Secret already holds, so that
`helm upgrade` keeps it, else a new one. Without a cluster (`helm template`) lookup
finds nothing and every render makes a new one. Kept in .Values for the rest of the
render, so that the Secret and its checksum annotation hold the same token.
*/}}
{{- define "fleet.generatedToken" -}}
{{- if not (hasKey .Values.auth "_generatedToken") }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "fleet.secretName" .) }}
{{- $token := dig "data" "admin-token" "" $existing | b64dec }}
{{- $_ := set .Values.auth "_generatedToken" (default (randAlphaNum 32) $token) }}
{{- end }}
{{- .Values.auth._generatedToken }}
{{- end }}

{{/*
True (non-empty) when the chart's own Secret has something to hold.
*/}}
{{- define "fleet.ownSecret" -}}
{{- if or .Values.redis.url .Values.auth.apiKeys (include "fleet.generatesApiKey" .) }}true{{ end }}
{{- end }}

{{/*
The API keys as FLEET_API_KEYS wants them: principal:token,principal:token (sorted).
*/}}
{{- define "fleet.apiKeys" -}}
{{- $pairs := list }}
{{- range $principal, $token := .Values.auth.apiKeys }}
{{- $pairs = append $pairs (printf "%s:%s" $principal $token) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/*
Refuse a release that cannot work: no Redis (the trial one turned off and none named),
two of them, a token too short, a termination budget shorter than the drain.
*/}}
{{- define "fleet.validate" -}}
{{- if not (or .Values.redis.url .Values.existingSecret (include "fleet.trialRedis" .)) }}
{{- fail "\n\nfleet needs a Redis, and redis.trial.enabled=false turns off the trial one. Set one of:\n  redis.url=redis://HOST:6379/0 (or a rediss://, Sentinel or Cluster URL),\n  existingSecret=NAME (a Secret with key FLEET_REDIS_URL, see existingSecretKeys),\n  redis.trial.enabled=true, or leave it unset (a single-instance Redis for trials, not for production)." }}
{{- end }}
{{- if and .Values.redis.url .Values.redis.trial.enabled }}
{{- fail "\n\nSet either redis.url or redis.trial.enabled=true, not both." }}
{{- end }}
{{- range $principal, $token := .Values.auth.apiKeys }}
{{- if lt (len (toString $token)) 16 }}
{{- fail (printf "\n\nauth.apiKeys.%s: the token must have at least 16 characters." $principal) }}
{{- end }}
{{- end }}
{{- $minimum := include "fleet.minimumTerminationGracePeriodSeconds" . | int }}
{{- if and (not (kindIs "invalid" .Values.terminationGracePeriodSeconds)) (lt (int .Values.terminationGracePeriodSeconds) $minimum) }}
{{- fail (printf "\n\nterminationGracePeriodSeconds=%v is shorter than preStopSleepSeconds + fleet.drainTimeout + fleet.closeGrace = %d: the kubelet would kill nodes before they hand their sessions off." .Values.terminationGracePeriodSeconds $minimum) }}
{{- end }}
{{- end }}

{{/*
Termination budget. On pod deletion the kubelet runs the preStop sleep (endpoints drop
meanwhile), then sends SIGTERM: the node drains for drainTimeout, then asks the
remaining sessions to hand off and gives them closeGrace to checkpoint. The margin
covers the handoff itself and process exit.
*/}}
{{- define "fleet.minimumTerminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int (ceil .Values.fleet.drainTimeout)) (int (ceil .Values.fleet.closeGrace)) }}
{{- end }}

{{- define "fleet.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "fleet.minimumTerminationGracePeriodSeconds" . | int) (int .Values.terminationGraceMarginSeconds) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Environment of the fleet container that comes from Secrets. Shared by the Deployment
and the helm test pod.
*/}}
{{- define "fleet.redisUrlEnv" -}}
- name: FLEET_REDIS_URL
{{- if include "fleet.trialRedis" . }}
  value: {{ printf "redis://%s:6379/0" (include "fleet.trialRedisName" .) | quote }}
{{- else if .Values.redis.url }}
  valueFrom:
    secretKeyRef:
      name: {{ include "fleet.secretName" . }}
      key: FLEET_REDIS_URL
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret }}
      key: {{ .Values.existingSecretKeys.redisUrl }}
{{- end }}
{{- end }}

{{- define "fleet.apiKeysEnv" -}}
{{- if or .Values.auth.apiKeys (include "fleet.generatesApiKey" .) }}
- name: FLEET_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "fleet.secretName" . }}
      key: FLEET_API_KEYS
{{- else if .Values.existingSecret }}
- name: FLEET_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.existingSecret }}
      key: {{ .Values.existingSecretKeys.apiKeys }}
      {{- if .Values.auth.allowUnauthenticated }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/*
Default spread: across zones and nodes, best effort, counting pods of the same pool and
rollout only (matchLabelKeys) so that an update does not skew the new ReplicaSet.
Args: root, pool.
*/}}
{{- define "fleet.topologySpreadConstraints" -}}
{{- $selector := include "fleet.poolSelectorLabels" . }}
{{- $values := .root.Values }}
{{- if $values.topologySpreadConstraints }}
{{- range $values.topologySpreadConstraints }}
- {{ toYaml (merge (dict) . (dict "labelSelector" (dict "matchLabels" (fromYaml $selector)))) | nindent 2 | trim }}
{{- end }}
{{- else if $values.topologySpread.enabled }}
{{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
- maxSkew: 1
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- $selector | nindent 6 }}
  matchLabelKeys:
    - pod-template-hash
{{- end }}
{{- end }}
{{- end }}
