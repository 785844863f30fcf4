{{/*
Pools: one Deployment each, with its own worker set, all behind the one Service.

The pool named "default" is the Deployment the chart has always made: it keeps the
release's full name and its selector (component "node"), so that a release from before
pools upgrades in place. Any other pool P is "<fullname>-P" with component "node-P", so
that no Deployment, PodDisruptionBudget or HorizontalPodAutoscaler selects another
pool's pods. Every pool's pods carry fleet/pool=P and fleet/node=true; the Service
selects the latter once there is more than the default pool.
*/}}

{{/*
The enabled pools as JSON {"pools": [...]}: "default" first (it exists unless
pools.default.enabled=false), then the others by name. A key a pool leaves out comes
from the top level; autoscaling and podDisruptionBudget are taken key by key.
*/}}
{{- define "fleet.pools" -}}
{{- $given := .Values.pools | default dict }}
{{- $fullname := include "fleet.fullname" . }}
{{- $pools := list }}
{{- range $name := prepend (without (keys $given | sortAlpha) "default") "default" }}
{{- $pool := get $given $name | default dict }}
{{- if ne (toString (get $pool "enabled")) "false" }}
{{- $default := eq $name "default" }}
{{- $resolved := dict
  "name" $name
  "fullname" (ternary $fullname (printf "%s-%s" $fullname $name) $default)
  "component" (ternary "node" (printf "node-%s" $name) $default)
  "workers" ($pool.workers | default dict)
  "defaultWorker" ($pool.defaultWorker | default "")
  "config" ($pool.config | default dict)
  "env" ($pool.env | default list)
}}
{{- range $key, $top := dict "replicas" "replicaCount" "resources" "resources" "nodeSelector" "nodeSelector" "tolerations" "tolerations" "affinity" "affinity" }}
{{- $_ := set $resolved $key (ternary (get $pool $key) (get $.Values $top) (hasKey $pool $key)) }}
{{- end }}
{{- range $key := list "autoscaling" "podDisruptionBudget" }}
{{- $layered := deepCopy (get $.Values $key) }}
{{- range $setting, $value := (get $pool $key | default dict) }}
{{- $_ := set $layered $setting $value }}
{{- end }}
{{- $_ := set $resolved $key $layered }}
{{- end }}
{{- $pools = append $pools $resolved }}
{{- end }}
{{- end }}
{{- toJson (dict "pools" $pools) }}
{{- end }}

{{/* True (non-empty) when the default pool is the only one: the chart as before pools. */}}
{{- define "fleet.defaultPoolOnly" -}}
{{- $pools := (include "fleet.pools" . | fromJson).pools }}
{{- if and (eq (len $pools) 1) (eq (first $pools).name "default") }}true{{ end }}
{{- end }}

{{/*
Selects the pods of every pool: the Service, the NetworkPolicies. With the default pool
alone it is the selector from before pools, so that an upgrade leaves the Service as it
was; pods of this chart carry fleet/node=true already, so that adding a pool later
changes the Service's selector without dropping a pod from it.
*/}}
{{- define "fleet.servingSelectorLabels" -}}
{{- if include "fleet.defaultPoolOnly" . }}
{{- include "fleet.nodeSelectorLabels" . }}
{{- else }}
{{- include "fleet.selectorLabels" . }}
fleet/node: "true"
{{- end }}
{{- end }}

{{/* Selects one pool's pods: its Deployment, PodDisruptionBudget, spread. Args: root, pool. */}}
{{- define "fleet.poolSelectorLabels" -}}
{{ include "fleet.selectorLabels" .root }}
app.kubernetes.io/component: {{ .pool.component }}
{{- end }}

{{/* Labels of a pool's Deployment, HorizontalPodAutoscaler, PodDisruptionBudget and pods. */}}
{{- define "fleet.poolLabels" -}}
{{ include "fleet.labels" .root }}
app.kubernetes.io/component: {{ .pool.component }}
fleet/pool: {{ .pool.name }}
{{- end }}

{{/*
FLEET_WORKER of a pool: its default worker first, then the others by name. Empty when
the pool names no workers: fleet.worker in the ConfigMap applies.
*/}}
{{- define "fleet.poolWorker" -}}
{{- $workers := .workers }}
{{- if $workers }}
{{- $first := ternary .defaultWorker (keys $workers | first) (gt (len $workers) 1) }}
{{- $entries := list (printf "%s=%s" $first (get $workers $first)) }}
{{- range $name := without (keys $workers | sortAlpha) $first }}
{{- $entries = append $entries (printf "%s=%s" $name (get $workers $name)) }}
{{- end }}
{{- join "," $entries }}
{{- end }}
{{- end }}

{{/*
The env of a pool's fleet container: Secrets, extraEnv, then what the pool adds.
Args: root, pool.
*/}}
{{- define "fleet.poolEnv" -}}
{{- $root := .root }}
{{ include "fleet.redisUrlEnv" $root | trim }}
{{- with (include "fleet.apiKeysEnv" $root | trim) }}
{{ . }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with (include "fleet.poolWorker" .pool) }}
- name: FLEET_WORKER
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := .pool.config }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with .pool.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Refuse pools that cannot work: a name that makes too long a resource name or takes the
trial Redis' name, a setting that must be the same in every pool, a worker set without
a default, one env variable set twice.
*/}}
{{- define "fleet.validatePools" -}}
{{- $pools := (include "fleet.pools" . | fromJson).pools }}
{{- if not $pools }}
{{- fail "\n\nEvery pool is disabled (pools.NAME.enabled=false): enable at least one." }}
{{- end }}
{{- range $pool := $pools }}
{{- if eq $pool.name "redis" }}
{{- fail "\n\npools.redis: the name redis is taken by the trial Redis (<fullname>-redis); choose another." }}
{{- end }}
{{- if gt (len $pool.fullname) 63 }}
{{- fail (printf "\n\npools.%s: the Deployment name %s is longer than 63 characters; choose a shorter pool name or fullnameOverride." $pool.name $pool.fullname) }}
{{- end }}
{{- if hasKey $pool.config "FLEET_WORKER" }}
{{- fail (printf "\n\npools.%s.config.FLEET_WORKER: name the pool's workers in pools.%s.workers." $pool.name $pool.name) }}
{{- end }}
{{- range $name := list "FLEET_KEY_PREFIX" "FLEET_HOST" "FLEET_PORT" "FLEET_DRAIN_TIMEOUT" "FLEET_CLOSE_GRACE" }}
{{- if hasKey $pool.config $name }}
{{- fail (printf "\n\npools.%s.config.%s must be the same in every pool: set it with the fleet.* values or containerPort." $pool.name $name) }}
{{- end }}
{{- end }}
{{- $workers := $pool.workers }}
{{- if and $pool.defaultWorker (not (hasKey $workers $pool.defaultWorker)) }}
{{- fail (printf "\n\npools.%s.defaultWorker=%s is not one of pools.%s.workers (%s)." $pool.name $pool.defaultWorker $pool.name (keys $workers | sortAlpha | join ", ")) }}
{{- end }}
{{- if and (gt (len $workers) 1) (not $pool.defaultWorker) }}
{{- fail (printf "\n\npools.%s runs several workers (%s): set pools.%s.defaultWorker to the one a start that names no worker gets." $pool.name (keys $workers | sortAlpha | join ", ") $pool.name) }}
{{- end }}
{{- $seen := dict }}
{{- range $entry := include "fleet.poolEnv" (dict "root" $ "pool" $pool) | fromYamlArray }}
{{- if hasKey $seen $entry.name }}
{{- fail (printf "\n\npools.%s: the fleet container would get %s twice (from extraEnv, pools.%s.config, pools.%s.env or the chart's own Secrets); set it once." $pool.name $entry.name $pool.name $pool.name) }}
{{- end }}
{{- $_ := set $seen $entry.name true }}
{{- end }}
{{- end }}
{{- end }}
