{{/* Names: the chart's name in kebab case (an alias such as vlaInference becomes vla-inference). */}}
{{- define "vla-inference.name" -}}
{{- .Chart.Name | kebabcase | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vla-inference.fullname" -}}
{{- printf "%s-%s" .Release.Name (include "vla-inference.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vla-inference.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vla-inference.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "vla-inference.labels" -}}
{{ include "vla-inference.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The original design's block, given directly (`vlaInference:`) or as the subchart's own values. */}}
{{- define "vla-inference.design" -}}
{{- toYaml (.Values.vlaInference | default dict) -}}
{{- end -}}

{{/* "true" when this chart renders anything. */}}
{{- define "vla-inference.enabled" -}}
{{- $design := include "vla-inference.design" . | fromYaml -}}
{{- if hasKey $design "enabled" -}}
{{- if $design.enabled }}true{{ end -}}
{{- else if hasKey .Values "enabled" -}}
{{- if .Values.enabled }}true{{ end -}}
{{- else -}}
true
{{- end -}}
{{- end -}}

{{- define "vla-inference.modelType" -}}
{{- $design := include "vla-inference.design" . | fromYaml -}}
{{- coalesce $design.modelType .Values.modelType .Values.env.VLA_MODEL_TYPE "pi0" -}}
{{- end -}}

{{- define "vla-inference.device" -}}
{{- $design := include "vla-inference.design" . | fromYaml -}}
{{- coalesce $design.device .Values.device .Values.env.VLA_DEVICE "cpu" -}}
{{- end -}}

{{/* resources, with the design's merged over them; no GPU request for a device other than cuda. */}}
{{- define "vla-inference.resources" -}}
{{- $design := include "vla-inference.design" . | fromYaml -}}
{{- $resources := deepCopy (.Values.resources | default dict) -}}
{{- if $design.resources -}}
{{- $resources = mergeOverwrite $resources (deepCopy $design.resources) -}}
{{- end -}}
{{- if not (hasPrefix "cuda" (include "vla-inference.device" .)) -}}
{{- range $part := list "limits" "requests" -}}
{{- if hasKey $resources $part -}}
{{- $_ := unset (get $resources $part) "nvidia.com/gpu" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* Drain timing (seconds): VLA_SHUTDOWN_GRACE_S, and the pod's termination grace period. */}}
{{- define "vla-inference.shutdownGrace" -}}
{{- .Values.env.VLA_SHUTDOWN_GRACE_S | default .Values.drain.graceSeconds -}}
{{- end -}}

{{- define "vla-inference.terminationGrace" -}}
{{- $grace := include "vla-inference.shutdownGrace" . | float64 -}}
{{- $needed := addf .Values.drain.preStopSleepSeconds $grace | ceil | int -}}
{{- if kindIs "string" .Values.terminationGracePeriodSeconds -}}
{{- add $needed .Values.drain.marginSeconds -}}
{{- else if lt (int .Values.terminationGracePeriodSeconds) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds=%v is shorter than drain.preStopSleepSeconds + the shutdown grace (%d s): Kubernetes would kill replicas mid-drain" .Values.terminationGracePeriodSeconds $needed) -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}
