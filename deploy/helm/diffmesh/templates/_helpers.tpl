{{/*
Names. Resources are "<fullname>-<stage>[-canary]" with the stage's underscores as dashes
(text_encoder -> text-encoder). fullname is cut to 42 characters so that the longest name,
"<fullname>-text-encoder-canary", stays a valid 63-character DNS label.
*/}}
{{- define "diffmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "diffmesh.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- end -}}

{{- define "diffmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Every stage's values, as JSON {stage: values}: `stageDefaults` with `stages.<stage>` merged over
it, so a stage's entry holds only what differs from the shared defaults. Both sides are deep
copies (merge functions mutate their first argument, and .Values must stay untouched). Callers:
`include "diffmesh.stages" $ | fromJson`. The keys of `stages` are the stages: adding a stage to
the chart is one entry there (tests/deploy checks the set against diffmesh/stages.py).
*/}}
{{- define "diffmesh.stages" -}}
{{- $known := include "diffmesh.settingNames" . | fromJson -}}
{{- $out := dict -}}
{{- range $name, $own := .Values.stages -}}
{{- $own = default dict $own -}}
{{- $merged := mergeOverwrite (deepCopy $.Values.stageDefaults) (deepCopy $own) -}}
{{- /* stageDefaults' settings reach only the stages that have them (a service refuses a
DIFFMESH_* variable it does not know); the stage's own are kept as given (validateStage checks
them against the stage's names) */ -}}
{{- $has := default list (get $known $name) -}}
{{- $settings := dict -}}
{{- range $k, $v := (default dict $.Values.stageDefaults.settings) -}}{{- if has $k $has -}}{{- $_ := set $settings $k $v -}}{{- end -}}{{- end -}}
{{- range $k, $v := (default dict (get $own "settings")) -}}{{- $_ := set $settings $k $v -}}{{- end -}}
{{- $_ := set $merged "settings" $settings -}}
{{- $canary := dict -}}
{{- range $k, $v := (default dict (dig "canary" "settings" dict $.Values.stageDefaults)) -}}{{- if has $k $has -}}{{- $_ := set $canary $k $v -}}{{- end -}}{{- end -}}
{{- range $k, $v := (default dict (dig "canary" "settings" dict $own)) -}}{{- $_ := set $canary $k $v -}}{{- end -}}
{{- $_ := set $merged.canary "settings" $canary -}}
{{- $_ := set $out $name $merged -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
The settings each stage has, {stage: [name, ...]}: files/stage-settings.json, generated from the
stages' config dataclasses (`python -m diffmesh.stage_settings`; a test fails when it is stale).
*/}}
{{- define "diffmesh.settingNames" -}}
{{- .Files.Get "files/stage-settings.json" -}}
{{- end -}}

{{/*
The global `settings` a stage gets, as JSON: those it has. A global setting applies to every stage
that has it (a limit such as max_size is set once for the orchestrator and the stages enforcing
it); the schema refuses a name no stage has. dict root stage -> JSON
*/}}
{{- define "diffmesh.globalSettings" -}}
{{- $has := default list (get (include "diffmesh.settingNames" .root | fromJson) .stage) -}}
{{- $out := dict -}}
{{- range $k, $v := .root.Values.settings -}}{{- if has $k $has -}}{{- $_ := set $out $k $v -}}{{- end -}}{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* One stage's merged values (see diffmesh.stages). dict root stage -> JSON */}}
{{- define "diffmesh.stageValues" -}}
{{- toJson (get (include "diffmesh.stages" .root | fromJson) .stage) -}}
{{- end -}}

{{/* The one stage with role frontend (the orchestrator: the public API, it calls the backends). */}}
{{- define "diffmesh.frontend" -}}
{{- $frontends := list -}}
{{- range $name, $s := (include "diffmesh.stages" . | fromJson) -}}
{{- if eq $s.role "frontend" -}}{{- $frontends = append $frontends $name -}}{{- end -}}
{{- end -}}
{{- if ne (len $frontends) 1 -}}
{{- fail (printf "exactly one stage must have role: frontend, got %d (%s)" (len $frontends) (join ", " $frontends)) -}}
{{- end -}}
{{- first $frontends -}}
{{- end -}}

{{/* dict "root" $ "stage" "text_encoder" -> "text-encoder" */}}
{{- define "diffmesh.stageDash" -}}
{{- .stage | replace "_" "-" -}}
{{- end -}}

{{/* dict "root" $ "stage" name "variant" stable|canary -> resource name */}}
{{- define "diffmesh.resourceName" -}}
{{- $base := printf "%s-%s" (include "diffmesh.fullname" .root) (include "diffmesh.stageDash" .) -}}
{{- if eq .variant "canary" -}}{{ $base }}-canary{{- else -}}{{ $base }}{{- end -}}
{{- end -}}

{{- define "diffmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "diffmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries, less the selector ones. Takes the root context. */}}
{{- define "diffmesh.metaLabels" -}}
helm.sh/chart: {{ include "diffmesh.chart" . }}
app.kubernetes.io/part-of: diffmesh
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels of release-wide objects (ConfigMap, ServiceAccount, ServiceMonitor). Root context. */}}
{{- define "diffmesh.commonLabels" -}}
{{ include "diffmesh.metaLabels" . }}
app.kubernetes.io/name: {{ include "diffmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector of every pod of one stage, both variants (PDB, NetworkPolicy). dict root stage */}}
{{- define "diffmesh.stageSelectorLabels" -}}
app.kubernetes.io/name: {{ include "diffmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ include "diffmesh.stageDash" . }}
{{- end -}}

{{/* Selector of one stage's variant (Deployment, Service, HPA). dict root stage variant */}}
{{- define "diffmesh.selectorLabels" -}}
{{ include "diffmesh.stageSelectorLabels" . }}
diffmesh.io/variant: {{ .variant }}
{{- end -}}

{{/* Labels of one stage's variant objects. dict root stage variant */}}
{{- define "diffmesh.labels" -}}
{{ include "diffmesh.metaLabels" .root }}
{{ include "diffmesh.selectorLabels" . }}
{{- end -}}

{{/* Labels of one stage's objects spanning both variants (PDB, NetworkPolicy). dict root stage */}}
{{- define "diffmesh.stageLabels" -}}
{{ include "diffmesh.metaLabels" .root }}
{{ include "diffmesh.stageSelectorLabels" . }}
{{- end -}}

{{/*
The image of a stage's variant: canary overrides > stage overrides > global image; the default
tag is the appVersion plus the CPU or CUDA suffix. dict root stage variant
*/}}
{{- define "diffmesh.image" -}}
{{- $g := .root.Values.image -}}
{{- $stage := include "diffmesh.stageValues" . | fromJson -}}
{{- $s := $stage.image -}}
{{- $c := dict -}}
{{- if eq .variant "canary" -}}{{- $c = $stage.canary.image -}}{{- end -}}
{{- $gpu := $stage.gpu -}}
{{- $repo := coalesce $c.repository $s.repository $g.repository -}}
{{- $digest := coalesce $c.digest $s.digest $g.digest -}}
{{- $suffix := ternary $g.gpuTagSuffix $g.cpuTagSuffix $gpu -}}
{{- $tag := coalesce $c.tag $s.tag $g.tag (printf "%s%s" .root.Chart.AppVersion $suffix) -}}
{{- if $digest -}}
{{- printf "%s@%s" $repo $digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* A setting's value as an env string: lists comma-joined, whole floats without a fraction. */}}
{{- define "diffmesh.settingValue" -}}
{{- if kindIs "slice" . -}}
{{- join "," . -}}
{{- else if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* host:port of an enabled stage's stable or canary Service. dict root stage variant */}}
{{- define "diffmesh.serviceAddress" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- printf "%s:%d" (include "diffmesh.resourceName" .) (int $s.port) -}}
{{- end -}}

{{/*
Fails the render for values a schema cannot check: cross-field rules of one stage.
dict root stage
*/}}
{{- define "diffmesh.validateStage" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- $drain := addf (float64 $s.gracePeriodS) (float64 .root.Values.preStopSleepSeconds) -}}
{{- $termination := include "diffmesh.terminationGrace" . -}}
{{- if le (float64 $termination) $drain -}}
{{- fail (printf "stages.%s.terminationGracePeriodSeconds (%v) must be longer than gracePeriodS (%v) + preStopSleepSeconds (%v): the kubelet would SIGKILL the stage mid-drain (0 derives it: gracePeriodS + preStopSleepSeconds + 10)" .stage $termination $s.gracePeriodS .root.Values.preStopSleepSeconds) -}}
{{- end -}}
{{- include "diffmesh.validateAutoscaling" . -}}
{{- if lt (float64 $s.gracePeriodS) 0.0 -}}{{- fail (printf "stages.%s.gracePeriodS must be >= 0" .stage) -}}{{- end -}}
{{- if and .root.Values.tls.secretName (le (int $s.probePort) 0) -}}
{{- fail (printf "stages.%s.probePort must be set when tls.secretName is: the kubelet's gRPC probes (and the helm test pod) speak plaintext, which an mTLS gRPC port refuses; probePort is the plaintext health-only port (DIFFMESH_HEALTH_PORT)" .stage) -}}
{{- end -}}
{{- if eq (int $s.port) (int $s.metricsPort) -}}
{{- fail (printf "stages.%s: port and metricsPort are both %v" .stage $s.port) -}}
{{- end -}}
{{- if and $s.autoscaling.enabled (lt (int $s.autoscaling.maxReplicas) (int $s.autoscaling.minReplicas)) -}}
{{- fail (printf "stages.%s.autoscaling: maxReplicas (%v) < minReplicas (%v)" .stage $s.autoscaling.maxReplicas $s.autoscaling.minReplicas) -}}
{{- end -}}
{{- if and $s.canary.enabled $s.canary.autoscaling.enabled (lt (int $s.canary.autoscaling.maxReplicas) (int $s.canary.autoscaling.minReplicas)) -}}
{{- fail (printf "stages.%s.canary.autoscaling: maxReplicas (%v) < minReplicas (%v)" .stage $s.canary.autoscaling.maxReplicas $s.canary.autoscaling.minReplicas) -}}
{{- end -}}
{{- $reserved := list "host" "port" "metrics_port" "health_port" "tls_cert_file" "tls_key_file" "tls_ca_file" "registry" "grace_period_s" "variant" -}}
{{- range $stageName, $_ := .root.Values.stages -}}
{{- $reserved = concat $reserved (list (printf "%s_address" $stageName) (printf "%s_canary_address" $stageName) (printf "%s_canary_weight" $stageName) (printf "%s_shadow_percent" $stageName)) -}}
{{- end -}}
{{- $sources := list (list "settings" $.root.Values.settings) (list "stageDefaults.settings" $.root.Values.stageDefaults.settings) (list "stageDefaults.canary.settings" $.root.Values.stageDefaults.canary.settings) (list (printf "stages.%s.settings" .stage) $s.settings) (list (printf "stages.%s.canary.settings" .stage) $s.canary.settings) (list (printf "stages.%s.secretSettings" .stage) $s.secretSettings) -}}
{{- range $pair := $sources -}}
{{- range $key, $_ := (index $pair 1) -}}
{{- if has $key $reserved -}}
{{- fail (printf "%s.%s is set by the chart (use the stage's port, metricsPort, gracePeriodS, canary or registry values)" (index $pair 0) $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* a setting the chart renders from other values must not be rendered twice */ -}}
{{- $owned := dict -}}
{{- if $s.state.mountPath -}}{{- $_ := set $owned "state_dir" "state.mountPath" -}}{{- end -}}
{{- if dig "c2pa" "secretName" "" $s -}}
{{- $_ := set $owned "c2pa_cert_chain" "c2pa.secretName" -}}{{- $_ := set $owned "c2pa_key" "c2pa.secretName" -}}
{{- end -}}
{{- range $key, $_ := $s.secretSettings -}}{{- $_ := set $owned $key "secretSettings" -}}{{- end -}}
{{- include "diffmesh.validateCallers" . -}}
{{- if dig "callers" "secretName" "" $s -}}
{{- $_ := set $owned "callers_file" "callers.secretName" -}}
{{- if hasKey $s.callers "reloadSeconds" -}}{{- $_ := set $owned "callers_reload_s" "callers.reloadSeconds" -}}{{- end -}}
{{- if hasKey $s.callers "batchEvery" -}}{{- $_ := set $owned "batch_every" "callers.batchEvery" -}}{{- end -}}
{{- end -}}
{{- $has := default list (get (include "diffmesh.settingNames" .root | fromJson) .stage) -}}
{{- range $pair := list (list "settings" $s.settings) (list "canary.settings" $s.canary.settings) (list "secretSettings" $s.secretSettings) -}}
{{- range $key, $_ := (index $pair 1) -}}
{{- if not (has $key $has) -}}
{{- fail (printf "stages.%s.%s.%s is not a setting of the %s stage (its settings: python -m %s --help)" $.stage (index $pair 0) $key $.stage (printf "services.%s" $.stage)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $global := include "diffmesh.globalSettings" . | fromJson -}}
{{- range $pair := list (list "settings" $s.settings) (list "canary.settings" $s.canary.settings) (list "settings" $global) -}}
{{- range $key, $_ := (index $pair 1) -}}
{{- with get $owned $key -}}
{{- fail (printf "stages.%s: %s.%s is also set by stages.%s.%s: set it in one place" $.stage (index $pair 0) $key $.stage .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if gt (len (keys $s.state.volume)) 1 -}}
{{- fail (printf "stages.%s.state.volume has %d sources (%s): values maps merge, so null the one you replace (e.g. emptyDir: null)" .stage (len (keys $s.state.volume)) (join ", " (keys $s.state.volume | sortAlpha))) -}}
{{- end -}}
{{- $chartVolumes := list "tmp" "models" "registry" "tls" "state" "c2pa" "callers" -}}
{{- range $volume := $s.extraVolumes -}}
{{- if has $volume.name $chartVolumes -}}
{{- fail (printf "stages.%s.extraVolumes: the volume name %q is the chart's own (%s)" $.stage $volume.name (join ", " $chartVolumes)) -}}
{{- end -}}
{{- end -}}
{{- if eq .stage "safety" -}}{{- include "diffmesh.validateSafety" . -}}{{- end -}}
{{- end -}}

{{/*
The safety stage's own rules (dict root stage). Every image it returns is signed (C2PA), so a
signing chain must be chosen; and its embedded SQLite review queue is one pod's file, so sharing
the stage between pods needs PostgreSQL. The service refuses both at start-up too; the render
says so before anything is deployed.
*/}}
{{- define "diffmesh.validateSafety" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- $variants := list (list "stages.safety" dict) -}}
{{- if $s.canary.enabled -}}{{- $variants = append $variants (list "stages.safety.canary" $s.canary.settings) -}}{{- end -}}
{{- range $pair := $variants -}}
{{- /* the variant's settings as deployment.yaml renders them: global < stage < canary (set, not
merge: merge would take a canary's `false` for unset) */ -}}
{{- $settings := dict -}}
{{- range $source := list (include "diffmesh.globalSettings" $ | fromJson) $s.settings (index $pair 1) -}}
{{- range $k, $v := $source -}}{{- $_ := set $settings $k $v -}}{{- end -}}
{{- end -}}
{{- $signed := or (dig "c2pa" "secretName" "" $s) (get $settings "c2pa_cert_chain") (eq (toString (get $settings "c2pa_dev_chain")) "true") -}}
{{- if not $signed -}}
{{- fail (printf "%s: every returned image is C2PA-signed: set stages.safety.c2pa.secretName to a Secret with the signing chain and key (production), or stages.safety.settings.c2pa_dev_chain: true (a development chain, never in production)" (index $pair 0)) -}}
{{- end -}}
{{- end -}}
{{- $url := toString (default "" (get $s.settings "review_database_url")) -}}
{{- $shared := or (hasKey $s.secretSettings "review_database_url") (and $url (not (hasPrefix "sqlite" $url))) -}}
{{- if not $shared -}}
{{- $many := list -}}
{{- if $s.autoscaling.enabled -}}{{- $many = append $many "autoscaling.enabled" -}}{{- else if gt (int $s.replicas) 1 -}}{{- $many = append $many (printf "replicas: %d" (int $s.replicas)) -}}{{- end -}}
{{- if $s.canary.enabled -}}{{- $many = append $many "canary.enabled" -}}{{- end -}}
{{- if $many -}}
{{- fail (printf "stages.safety: %s with the embedded SQLite review queue, which is one pod's file: point secretSettings.review_database_url at a PostgreSQL database, or run one replica" (join " and " $many)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Caller admission (stages.<stage>.callers) is the frontend's: it admits every request once, before
any stage works. reloadSeconds and batchEvery tune the callers file's admission, so they need one.
dict root stage
*/}}
{{- define "diffmesh.validateCallers" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- $callers := default dict $s.callers -}}
{{- $given := list -}}
{{- range $key := list "secretName" "reloadSeconds" "batchEvery" -}}
{{- if and (hasKey $callers $key) (ne (toString (get $callers $key)) "") -}}{{- $given = append $given $key -}}{{- end -}}
{{- end -}}
{{- if and $given (ne $s.role "frontend") -}}
{{- fail (printf "stages.%s.callers (%s): caller admission is the frontend's (the stage with role: frontend), not a backend's" .stage (join ", " $given)) -}}
{{- end -}}
{{- if and (not (get $callers "secretName")) (or (hasKey $callers "reloadSeconds") (hasKey $callers "batchEvery")) -}}
{{- fail (printf "stages.%s.callers: reloadSeconds and batchEvery apply to a callers file, but callers.secretName is empty (admission is open): set secretName, or drop them" .stage) -}}
{{- end -}}
{{- end -}}

{{/* The directory the frontend's callers Secret is mounted at (stages.<frontend>.callers). */}}
{{- define "diffmesh.callersMount" -}}
/etc/diffmesh/callers
{{- end -}}

{{/* The registry file path inside the containers. */}}
{{- define "diffmesh.registryPath" -}}
{{- if eq .Values.registry.source "volume" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.models.mountPath) (trimPrefix "/" .Values.registry.path) -}}
{{- else -}}
/etc/diffmesh/registry/registry.yaml
{{- end -}}
{{- end -}}

{{/* The registry YAML the chart writes (configMap source): relative paths under models.mountPath. */}}
{{- define "diffmesh.registryContent" -}}
{{- $mount := trimSuffix "/" .Values.models.mountPath -}}
{{- $models := dict -}}
{{- range $id, $spec := .Values.registry.models -}}
{{- $path := $spec.path -}}
{{- if not (hasPrefix "/" $path) -}}{{- $path = printf "%s/%s" $mount $path -}}{{- end -}}
{{- $_ := set $models $id (dict "path" $path) -}}
{{- end -}}
{{- toYaml (dict "models" $models) -}}
{{- end -}}

{{- define "diffmesh.registryConfigMapName" -}}
{{- if .Values.registry.existingConfigMap -}}
{{- .Values.registry.existingConfigMap -}}
{{- else -}}
{{- printf "%s-registry" (include "diffmesh.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* An IntOrString value: "25%" quoted, a number as an integer. */}}
{{- define "diffmesh.intOrString" -}}
{{- if kindIs "string" . -}}{{- quote . -}}{{- else -}}{{- int . -}}{{- end -}}
{{- end -}}

{{/* Selector of the `helm test` pod (NetworkPolicy). Root context. */}}
{{- define "diffmesh.testPodSelectorLabels" -}}
app.kubernetes.io/name: {{ include "diffmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end -}}

{{/*
A stage's terminationGracePeriodSeconds: its own value, or with 0 the drain (gracePeriodS rounded
up) + preStopSleepSeconds + 10 s for the abandoned calls' UNAVAILABLE replies and the exit.
dict root stage -> an integer
*/}}
{{- define "diffmesh.terminationGrace" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- if gt (int $s.terminationGracePeriodSeconds) 0 -}}
{{- int $s.terminationGracePeriodSeconds -}}
{{- else -}}
{{- add (int (ceil (float64 $s.gracePeriodS))) (int .root.Values.preStopSleepSeconds) 10 -}}
{{- end -}}
{{- end -}}

{{/*
The autoscaling mode a stage runs: its `autoscaling.mode`, where `auto` is autoscaling.gpuStageMode
on GPU stages and autoscaling.cpuStageMode on the others. dict root stage -> cpu|hpa-pods|keda
*/}}
{{- define "diffmesh.autoscalingMode" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- $mode := $s.autoscaling.mode -}}
{{- if eq $mode "auto" -}}
{{- $mode = ternary .root.Values.autoscaling.gpuStageMode .root.Values.autoscaling.cpuStageMode $s.gpu -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/*
Requests in flight per replica the queue-aware modes aim at: autoscaling.targetInFlight, or with 0
the variant's compute slots: max_concurrency as its container gets it (global settings < stage
settings < canary settings), else the services' default, 1. dict root stage variant -> a number
*/}}
{{- define "diffmesh.targetInFlight" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- if gt (float64 $s.autoscaling.targetInFlight) 0.0 -}}
{{- include "diffmesh.settingValue" $s.autoscaling.targetInFlight -}}
{{- else -}}
{{- $slots := 1 -}}
{{- $sources := list (include "diffmesh.globalSettings" . | fromJson) $s.settings -}}
{{- if eq .variant "canary" -}}{{- $sources = append $sources $s.canary.settings -}}{{- end -}}
{{- range $source := $sources -}}
{{- if hasKey $source "max_concurrency" -}}{{- $slots = get $source "max_concurrency" -}}{{- end -}}
{{- end -}}
{{- include "diffmesh.settingValue" $slots -}}
{{- end -}}
{{- end -}}

{{/*
The HPA behavior of a stage (an HPA's spec.behavior, a ScaledObject's
advanced.horizontalPodAutoscalerConfig.behavior), as JSON: by default scale-down removes at most
max(1 pod, 25%) per terminationGracePeriodSeconds (at most 1800, the API's limit), after a 300 s
stabilization window, so that one batch of pods has drained (or been killed) before the next one
goes; scale-up keeps Kubernetes' default. `autoscaling.behavior` merges over it (maps key by key,
lists replace). dict root stage
*/}}
{{- define "diffmesh.scaleBehavior" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- $period := min 1800 (int (include "diffmesh.terminationGrace" .)) -}}
{{- $default := dict "scaleDown" (dict "stabilizationWindowSeconds" 300 "selectPolicy" "Max" "policies" (list (dict "type" "Pods" "value" 1 "periodSeconds" $period) (dict "type" "Percent" "value" 25 "periodSeconds" $period))) -}}
{{- toJson (mergeOverwrite $default (deepCopy (default dict $s.autoscaling.behavior))) -}}
{{- end -}}

{{/*
PromQL label matchers selecting one Deployment's series as the chart's ServiceMonitor scrapes them:
the release namespace and job "<Service name>" (= the Deployment's name), plus
autoscaling.prometheus.matchers. dict root stage variant
*/}}
{{- define "diffmesh.promSelector" -}}
{{- $matchers := list (printf "namespace=%q" .root.Release.Namespace) (printf "job=%q" (include "diffmesh.resourceName" .)) -}}
{{- range $k, $v := .root.Values.autoscaling.prometheus.matchers -}}
{{- $matchers = append $matchers (printf "%s=%q" $k (toString $v)) -}}
{{- end -}}
{{- join ", " $matchers -}}
{{- end -}}

{{/*
The KEDA prometheus triggers' queries for one Deployment, as JSON {inFlight, queueDepth}: the
total over its ready pods (diffmesh_ready 1: draining pods, whose calls finish where they are, and
pods still loading are left out), averaged over autoscaling.prometheus.window. KEDA's AverageValue
metric type divides the total by the replica count: the threshold is per replica.
dict root stage variant
*/}}
{{- define "diffmesh.loadQueries" -}}
{{- $sel := include "diffmesh.promSelector" . -}}
{{- $window := .root.Values.autoscaling.prometheus.window -}}
{{- $ready := printf "(diffmesh_ready{%s} == 1)" $sel -}}
{{- $inFlight := printf "sum(avg_over_time(diffmesh_grpc_in_flight_requests{%s}[%s]) and on (namespace, pod) %s) or vector(0)" $sel $window $ready -}}
{{- $queue := printf "sum(avg_over_time(diffmesh_queue_depth{%s}[%s]) and on (namespace, pod) %s) or vector(0)" $sel $window $ready -}}
{{- toJson (dict "inFlight" $inFlight "queueDepth" $queue) -}}
{{- end -}}

{{/*
prometheus-adapter rules (its config.yaml) serving the hpa-pods metrics per pod: the in-flight
requests (summed over methods) and the queue depth, each averaged over autoscaling.prometheus.window,
under the names autoscaling.prometheusAdapter.*Metric (not the raw series' names, which the
adapter's default rules may already serve unsmoothed). Root context -> YAML
*/}}
{{- define "diffmesh.adapterRules" -}}
{{- $window := .Values.autoscaling.prometheus.window -}}
{{- $rules := list -}}
{{- range $pair := list (list "diffmesh_grpc_in_flight_requests" .Values.autoscaling.prometheusAdapter.inFlightMetric) (list "diffmesh_queue_depth" .Values.autoscaling.prometheusAdapter.queueDepthMetric) -}}
{{- $series := index $pair 0 -}}
{{- $rules = append $rules (dict
    "seriesQuery" (printf "%s{namespace!=\"\",pod!=\"\"}" $series)
    "resources" (dict "overrides" (dict "namespace" (dict "resource" "namespace") "pod" (dict "resource" "pod")))
    "name" (dict "matches" (printf "^%s$" $series) "as" (index $pair 1))
    "metricsQuery" (printf "sum by (<<.GroupBy>>) (avg_over_time(<<.Series>>{<<.LabelMatchers>>}[%s]))" $window)) -}}
{{- end -}}
{{- toYaml (dict "rules" $rules) -}}
{{- end -}}

{{/*
Fails the render for autoscaling values that contradict each other (dict root stage).
*/}}
{{- define "diffmesh.validateAutoscaling" -}}
{{- $s := include "diffmesh.stageValues" . | fromJson -}}
{{- $mode := include "diffmesh.autoscalingMode" . -}}
{{- $scaled := or $s.autoscaling.enabled (and $s.canary.enabled $s.canary.autoscaling.enabled) -}}
{{- if $scaled -}}
{{- if and (eq $mode "keda") $s.autoscaling.metrics -}}
{{- fail (printf "stages.%s.autoscaling.metrics is an HPA MetricSpec list, but the stage's autoscaling mode is keda (KEDA owns its HPA): use autoscaling.extraTriggers for more ScaledObject triggers, or mode cpu / hpa-pods" .stage) -}}
{{- end -}}
{{- if and (ne $mode "keda") $s.autoscaling.extraTriggers -}}
{{- fail (printf "stages.%s.autoscaling.extraTriggers are KEDA triggers, but the stage's autoscaling mode is %s: set stages.%s.autoscaling.mode: keda (or autoscaling.gpuStageMode / cpuStageMode)" .stage $mode .stage) -}}
{{- end -}}
{{- end -}}
{{- end -}}
