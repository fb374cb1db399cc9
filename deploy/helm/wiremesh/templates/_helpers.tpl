{{/* Labels every object carries. */}}
{{- define "wiremesh.labels" -}}
app.kubernetes.io/name: wiremesh
app.kubernetes.io/part-of: wiremesh
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* Selector labels of one component: "agent" or "controller". */}}
{{- define "wiremesh.selector" -}}
app.kubernetes.io/name: wiremesh
app.kubernetes.io/component: {{ . }}
{{- end }}

{{- define "wiremesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The namespace is fixed: the agent, controller and meshctl look there. */}}
{{- define "wiremesh.namespace" -}}
wiremesh-system
{{- end }}
